# kubemaas-server (CPU): ONNX Runtime from the official onnxruntime wheel, non-root.
#   docker build -f images/server.Dockerfile -t kubemaas/server:0.1.0 .
# (Not built in this project's CI: its machines have no Docker engine.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kubemaas-server

FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION=1.31.1
RUN pip download --no-deps --only-binary=:all: --dest /wheels "onnxruntime==${ORT_VERSION}" \
 && python -m zipfile -e /wheels/onnxruntime-*.whl /ort \
 && cp "/ort/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /libonnxruntime.so

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=ort /libonnxruntime.so /usr/lib/kubemaas/libonnxruntime.so
COPY --from=build /src/target/release/kubemaas-server /kubemaas-server
ENV ORT_DYLIB_PATH=/usr/lib/kubemaas/libonnxruntime.so
USER 65532:65532
EXPOSE 8080 8081 9090
ENTRYPOINT ["/kubemaas-server"]
CMD ["serve", "--model-repository", "/models"]
