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
SERVER="$ROOT/target/release/kubemaas-server"
MODEL="$KUBEMAAS_MODELS/ocr-cls/1/model.onnx"
LEVELS=("$@")
[ ${#LEVELS[@]} -gt 0 ] || LEVELS=(1 4 16 64)
BATCH_FLAGS=(--max-batch-size 32 --max-queue-delay-us 2000 --max-queue-size 1024)
OUT="$(mktemp -d)"
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$OUT"' EXIT

run_server() { # flags... -> sets PID and PORT
  "$SERVER" --log-format json serve --host 127.0.0.1 --http-port 0 --grpc-port 0 --metrics-port 0 \
    --ort-library "$ORT_DYLIB_PATH" --model "ocr-cls=$MODEL" "$@" 2> "$OUT/server.log" &
  PID=$!
  for _ in $(seq 300); do
    PORT="$(sed -n 's/.*"message":"listening".*"http":"127.0.0.1:\([0-9]*\)".*/\1/p' "$OUT/server.log" | head -n1)"
    [ -n "$PORT" ] && curl -sf "127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not start: $(cat "$OUT/server.log")" >&2
  exit 1
}

measure() { # mode concurrency shape [extra...] -> "throughput p99_us"
  local mode="$1" c="$2" shape="$3"
  shift 3
  "$ROOT/scripts/perf_analyzer" -m ocr-cls -u "127.0.0.1:$PORT" -i http --shape "$shape" "$@" \
    --concurrency-range "$c:$c" --measurement-mode count_windows --measurement-request-count 400 \
    --stability-percentage 25 --max-trials 10 --percentile 99 > "$OUT/$mode-$c.txt" 2>&1 || {
      echo "perf_analyzer failed ($mode, concurrency $c):" >&2; tail -5 "$OUT/$mode-$c.txt" >&2; echo "0 0"; return; }
  local tput p99
  tput="$(sed -n "s/^Concurrency: $c, throughput: \([0-9.]*\) infer\/sec.*/\1/p" "$OUT/$mode-$c.txt" | tail -n1)"
  p99="$(sed -n 's/^ *p99 latency: \([0-9]*\) usec.*/\1/p' "$OUT/$mode-$c.txt" | tail -n1)"
  echo "${tput:-0} ${p99:-0}"
}

declare -A OFF ON
run_server
for c in "${LEVELS[@]}"; do OFF[$c]="$(measure off "$c" x:1,3,48,192)"; done
kill "$PID"; wait "$PID" 2>/dev/null || true
run_server "${BATCH_FLAGS[@]}"
for c in "${LEVELS[@]}"; do ON[$c]="$(measure on "$c" x:3,48,192 -b 1)"; done
kill "$PID"; wait "$PID" 2>/dev/null || true
PID=0

printf '\nocr-cls, one image per request, binary tensors, %s cores, %s\n' "$(nproc)" "$(date -u +%Y-%m-%d)"
printf 'batching on: %s\n\n' "${BATCH_FLAGS[*]}"
printf '| clients | off: infer/s | off: p99 ms | on: infer/s | on: p99 ms | on ÷ off |\n|---|---|---|---|---|---|\n'
for c in "${LEVELS[@]}"; do
  read -r t0 l0 <<< "${OFF[$c]}"
  read -r t1 l1 <<< "${ON[$c]}"
  ratio="$(awk -v a="$t1" -v b="$t0" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "n/a" }')"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$c" "$t0" "$(awk -v x="$l0" 'BEGIN{printf "%.1f", x/1000}')" \
    "$t1" "$(awk -v x="$l1" 'BEGIN{printf "%.1f", x/1000}')" "$ratio"
done
