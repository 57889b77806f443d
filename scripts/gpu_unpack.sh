#!/usr/bin/env bash
# Runs on the GPU machine, from the root of the working tree it was sent with, in the call that
# carries .gpu/p3 (scripts/gpu_pack.sh copies it to .gpu/assemble.sh). The three calls before left
# p0, p1 and p2 in /tmp/acc. It joins the parts, unpacks them into /tmp/kgpu and writes
# /tmp/kgpu/env.sh: ORT_DYLIB_PATH, and LD_LIBRARY_PATH with the machine's own CUDA 13 libraries
# (cuDNN, cuBLAS, ...), which its Python packages carry. docs/gpu.md walks through a run.
set -euo pipefail
mkdir -p /tmp/acc
cp .gpu/p3 /tmp/acc/
for i in 0 1 2; do
  if [ ! -f "/tmp/acc/p$i" ]; then
    if [ -f ".gpu/p$i" ]; then
      cp ".gpu/p$i" /tmp/acc/
    else
      echo "part p$i is missing: this is a fresh machine; send the parts again from p0" >&2
      exit 3
    fi
  fi
done
rm -rf /tmp/kgpu && mkdir -p /tmp/kgpu/lib
n="$(cat .gpu/cuda-bytes)"
cat /tmp/acc/p0 /tmp/acc/p1 /tmp/acc/p2 /tmp/acc/p3 > /tmp/acc/all
head -c "$n" /tmp/acc/all | xz -d > /tmp/kgpu/lib/libonnxruntime_providers_cuda.so
tail -c +"$((n + 1))" /tmp/acc/all | tar -xJ -C /tmp/kgpu
rm -f /tmp/acc/all
libs="$( (ls -d /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib \
  /usr/local/lib/python3*/dist-packages/nvidia/*/lib 2>/dev/null || true) | tr '\n' ':')"
if [ -z "$libs" ]; then
  echo "warning: no CUDA libraries found under the Python packages searched; set LD_LIBRARY_PATH to cuDNN 9 and CUDA 13's lib folders before running" >&2
fi
ort="$(ls /tmp/kgpu/lib/libonnxruntime.so.* | head -n1)"
{
  echo "export LD_LIBRARY_PATH=${libs}/tmp/kgpu/lib:\${LD_LIBRARY_PATH:-}"
  echo "export ORT_DYLIB_PATH=$ort"
} > /tmp/kgpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi here"
echo "unpacked into /tmp/kgpu; next: . /tmp/kgpu/env.sh && cd /tmp/kgpu && python3 extra/gpu_bench.py [steps]"
