#!/usr/bin/env bash
# Packs what the GPU benchmark (scripts/gpu_bench.py) needs on a GPU machine that cannot download
# anything and takes at most 64 MiB per transfer: the CUDA build of ONNX Runtime (onnxruntime-gpu),
# the release server, the ort_probe example, the PP-OCR models and their fp16 copies, perf_analyzer
# with its libraries, and the benchmark script. docs/gpu.md walks through a run.
#
# Usage, from anywhere in the repository:  bash scripts/gpu_pack.sh [EXTRA_FILE ...]
# Writes .gpu/p0 .. .gpu/p3 (about 57 MB each), .gpu/cuda-bytes and .gpu/assemble.sh (git-ignored).
# Downloads (one wheel from PyPI) and the compressed CUDA library are cached by version under
# ~/.cache/kubemaas/gpu/.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
cd "$(dirname "$0")/.."
CACHE="${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}"
WORK="$CACHE/gpu"
mkdir -p "$WORK/wheels"

# The tools and models the CPU suite uses (perf_analyzer, ONNX Runtime for fp16 conversion, models).
# (Assigned first: a failure inside `eval "$(...)"` would not stop the script.)
vars="$(bash scripts/setup.sh --test)"
eval "$vars"
export ORT_DYLIB_PATH

whl="$(ls "$WORK"/wheels/onnxruntime_gpu-"$ORT_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$whl" ]; then
  # The GPU machine's Python is 3.12; the wheel is only unpacked, never installed here.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WORK/wheels" "onnxruntime-gpu==$ORT_VERSION"
  whl="$(ls "$WORK"/wheels/onnxruntime_gpu-"$ORT_VERSION"-*.whl | head -n1)"
fi

# The CUDA provider is most of the bytes and never changes for a version: compress it once.
cuda_xz="$WORK/cuda-$ORT_VERSION.xz"
if [ ! -f "$cuda_xz" ]; then
  tmp="$(mktemp -d)"
  unzip -q -o -j "$whl" onnxruntime/capi/libonnxruntime_providers_cuda.so -d "$tmp"
  xz -6 -T0 -c "$tmp/libonnxruntime_providers_cuda.so" > "$cuda_xz.tmp"
  mv "$cuda_xz.tmp" "$cuda_xz"
  rm -rf "$tmp"
fi

cargo build -q --release -p kubemaas-server --bin kubemaas-server --example ort_probe

models="$CACHE/models"
fp16="$WORK/fp16"
mkdir -p "$fp16"
for m in ocr-cls ocr-det ocr-rec; do
  if [ ! -f "$fp16/$m.onnx" ]; then
    target/release/kubemaas-server compress --mode fp16 "$models/$m/1/model.onnx" "$fp16/$m.onnx" \
      > /dev/null 2> "$WORK/compress.log" || { cat "$WORK/compress.log" >&2; exit 1; }
  fi
done

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib" "$stage/bin" "$stage/extra/pa" "$stage/extra/fp16" "$stage/extra/rec"
unzip -q -o -j "$whl" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" \
  onnxruntime/capi/libonnxruntime_providers_shared.so -d "$stage/lib"
cp target/release/kubemaas-server "$stage/bin/"
for m in ocr-cls ocr-det; do
  mkdir -p "$stage/models/$m/1" && cp "$models/$m/1/model.onnx" "$stage/models/$m/1/"
done
cp "$models/ocr-rec/1/model.onnx" "$stage/extra/rec/"
cp "$fp16"/*.onnx "$stage/extra/fp16/"
cp "$KUBEMAAS_PERF_ANALYZER_LIBS"/* "$stage/extra/pa/"
cp target/release/examples/ort_probe scripts/gpu_bench.py "$stage/extra/"
for x in "$@"; do cp -r "$x" "$stage/extra/"; done
tar -C "$stage" -cf - . | xz -6 -T0 > "$WORK/rest.tar.xz"

rm -rf .gpu && mkdir .gpu
# split -n needs a file, to know the size to divide.
cat "$cuda_xz" "$WORK/rest.tar.xz" > "$WORK/all.bin"
split -n 4 -d -a 1 "$WORK/all.bin" .gpu/p
rm -f "$WORK/all.bin"
# One transfer carries at most 64 MiB, the working tree (a few MiB) included.
for part in .gpu/p?; do
  if [ "$(stat -c %s "$part")" -gt $((60 * 1024 * 1024)) ]; then
    echo "$part is over 60 MiB: pack fewer extra files" >&2
    exit 1
  fi
done
stat -c %s "$cuda_xz" > .gpu/cuda-bytes
cp scripts/gpu_unpack.sh .gpu/assemble.sh
ls -la .gpu >&2
echo "packed: send .gpu/p0, p1 and p2 one per call, then p3 with assemble.sh and cuda-bytes (docs/gpu.md)" >&2
