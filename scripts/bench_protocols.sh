#!/usr/bin/env bash
# REST vs gRPC, side by side in one run: one release server on 127.0.0.1 serving what `make run`
# serves (row-stats, a tiny model where the protocol is most of the cost, and the PP-OCR classifier
# ocr-cls, one image per request), driven by perf_analyzer over HTTP with binary tensors, over gRPC
# unary calls and over one gRPC stream per client. Prints throughput and p99 latency for each and
# the ratio to HTTP. Not part of `make test` (it measures; tests assert).
# Usage: scripts/bench_protocols.sh [CONCURRENCY...]   (default: 1 8)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
eval "$(bash scripts/setup.sh --clients)"
cargo build --release -q -p kubemaas-server
LEVELS=("$@")
[ ${#LEVELS[@]} -gt 0 ] || LEVELS=(1 8)
SERVER_FLAGS=(--instances 2 --intra-op-threads 1)
OUT="$(mktemp -d)"

# shellcheck source=scripts/bench_lib.sh
source "$ROOT/scripts/bench_lib.sh"
trap 'stop_server; rm -rf "$OUT"' EXIT

declare -A R
run_server --model-repository "$KUBEMAAS_QUICKSTART_REPOSITORY" "${SERVER_FLAGS[@]}"
for model in row-stats ocr-cls; do
  shape="x:1,10"
  [ "$model" = ocr-cls ] && shape="x:1,3,48,192"
  for c in "${LEVELS[@]}"; do
    R[$model,http,$c]="$(measure "$model-http" "$model" "$c" -u "127.0.0.1:$PORT" -i http --shape "$shape")"
    R[$model,grpc,$c]="$(measure "$model-grpc" "$model" "$c" -u "127.0.0.1:$GRPC_PORT" -i grpc --shape "$shape")"
    R[$model,stream,$c]="$(measure "$model-stream" "$model" "$c" -u "127.0.0.1:$GRPC_PORT" -i grpc --streaming --shape "$shape")"
  done
done
stop_server

printf '\nREST (binary tensors) vs gRPC, one row per request, %s cores, %s\n' "$(nproc)" "$(date -u +%Y-%m-%d)"
printf 'server: %s\n\n' "${SERVER_FLAGS[*]}"
printf '| model | clients | HTTP infer/s | HTTP p99 ms | gRPC infer/s | gRPC p99 ms | gRPC stream infer/s | stream p99 ms | gRPC ÷ HTTP | stream ÷ HTTP |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for model in row-stats ocr-cls; do
  for c in "${LEVELS[@]}"; do
    read -r th lh <<< "${R[$model,http,$c]}"
    read -r tg lg <<< "${R[$model,grpc,$c]}"
    read -r ts ls <<< "${R[$model,stream,$c]}"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$model" "$c" "$th" "$(ms "$lh")" \
      "$tg" "$(ms "$lg")" "$ts" "$(ms "$ls")" "$(ratio "$tg" "$th")" "$(ratio "$ts" "$th")"
  done
done
