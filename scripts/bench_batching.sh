#!/usr/bin/env bash
# Dynamic batching off vs on, side by side in one run: the release server on 127.0.0.1 serving
# the PP-OCR direction classifier (ocr-cls, one 3x48x192 image per request, binary tensors) to
# perf_analyzer at several concurrencies. Prints throughput and p99 latency for each and the ratio
# on/off. Not part of `make test` (it measures; tests assert).
# Usage: scripts/bench_batching.sh [CONCURRENCY...]   (default: 1 4 16 64)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
eval "$(bash scripts/setup.sh --clients)"
cargo build --release -q -p kubemaas-server
MODEL="$KUBEMAAS_MODELS/ocr-cls/1/model.onnx"
LEVELS=("$@")
[ ${#LEVELS[@]} -gt 0 ] || LEVELS=(1 4 16 64)
BATCH_FLAGS=(--max-batch-size 32 --max-queue-delay-us 2000 --max-queue-size 1024)
OUT="$(mktemp -d)"

# shellcheck source=scripts/bench_lib.sh
source "$ROOT/scripts/bench_lib.sh"
trap 'stop_server; rm -rf "$OUT"' EXIT

declare -A OFF ON
run_server --model "ocr-cls=$MODEL"
for c in "${LEVELS[@]}"; do OFF[$c]="$(measure off ocr-cls "$c" -u "127.0.0.1:$PORT" -i http --shape x:1,3,48,192)"; done
stop_server
run_server --model "ocr-cls=$MODEL" "${BATCH_FLAGS[@]}"
for c in "${LEVELS[@]}"; do ON[$c]="$(measure on ocr-cls "$c" -u "127.0.0.1:$PORT" -i http --shape x:3,48,192 -b 1)"; done
stop_server

printf '\nocr-cls, one image per request, binary tensors, %s cores, %s\n' "$(nproc)" "$(date -u +%Y-%m-%d)"
printf 'batching on: %s\n\n' "${BATCH_FLAGS[*]}"
printf '| clients | off: infer/s | off: p99 ms | on: infer/s | on: p99 ms | on ÷ off |\n|---|---|---|---|---|---|\n'
for c in "${LEVELS[@]}"; do
  read -r t0 l0 <<< "${OFF[$c]}"
  read -r t1 l1 <<< "${ON[$c]}"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$c" "$t0" "$(ms "$l0")" "$t1" "$(ms "$l1")" "$(ratio "$t1" "$t0")"
done
