#!/usr/bin/env bash
# What `make run` serves: the bundled models (the PP-OCR direction classifier `ocr-cls` and the
# small `row-stats` model) on 127.0.0.1, HTTP on :8080, gRPC on :8081 and metrics on :9090. The README's examples
# are written against exactly this (tests/test_readme.py runs them against it).
# KUBEMAAS_SERVER picks the binary (default: the release build), KUBEMAAS_HTTP_PORT,
# KUBEMAAS_GRPC_PORT and KUBEMAAS_METRICS_PORT the ports.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
eval "$(bash "$ROOT/scripts/setup.sh")"
SERVER="${KUBEMAAS_SERVER:-$ROOT/target/release/kubemaas-server}"
HTTP_PORT="${KUBEMAAS_HTTP_PORT:-8080}"
GRPC_PORT="${KUBEMAAS_GRPC_PORT:-8081}"
METRICS_PORT="${KUBEMAAS_METRICS_PORT:-9090}"
[ -x "$SERVER" ] || { echo "quickstart: $SERVER is missing; run 'make run' (it builds it)" >&2; exit 1; }
cat >&2 <<MSG

Serving on http://127.0.0.1:$HTTP_PORT (gRPC on :$GRPC_PORT, metrics on :$METRICS_PORT): "ocr-cls" (PP-OCR text
direction classifier) and "row-stats" (x: FP32 [-1,10] -> each row's sum, mean, max). Once ready:
  curl -s localhost:$HTTP_PORT/v2/models/row-stats
  curl -s -X POST localhost:$HTTP_PORT/v1/models/row-stats:predict -d '{"instances": [[1,2,3,4,5,6,7,8,9,10]]}'
The README's Examples section has more; 'make client-tools' installs tritonclient and perf_analyzer.
Ctrl-C stops the server.

MSG
exec "$SERVER" serve --host 127.0.0.1 --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  --model-repository "$KUBEMAAS_QUICKSTART_REPOSITORY" --ort-library "$ORT_DYLIB_PATH"
