# kubemaas-server (CUDA): NVIDIA CUDA 13 + cuDNN 9 runtime with onnxruntime-gpu 1.31.1, non-root.
#   docker build -f images/server-cuda.Dockerfile -t kubemaas/server-cuda:0.1.0 .
# (Not built in this project's CI: its machines have no Docker engine.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kubemaas-server

FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION=1.31.1
RUN pip download --no-deps --only-binary=:all: --dest /wheels "onnxruntime-gpu==${ORT_VERSION}" \
 && python -m zipfile -e /wheels/onnxruntime_gpu-*.whl /ort \
 && mkdir /lib-ort \
 && cp "/ort/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /lib-ort/libonnxruntime.so \
 && cp /ort/onnxruntime/capi/libonnxruntime_providers_shared.so /ort/onnxruntime/capi/libonnxruntime_providers_cuda.so /lib-ort/

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
COPY --from=ort /lib-ort/ /usr/lib/kubemaas/
COPY --from=build /src/target/release/kubemaas-server /usr/local/bin/kubemaas-server
ENV ORT_DYLIB_PATH=/usr/lib/kubemaas/libonnxruntime.so \
    LD_LIBRARY_PATH=/usr/lib/kubemaas
USER 65532:65532
EXPOSE 8080 8081 9090
ENTRYPOINT ["/usr/local/bin/kubemaas-server"]
CMD ["serve", "--model-repository", "/models", "--execution-provider", "cuda"]
