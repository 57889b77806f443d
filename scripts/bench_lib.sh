# Shared by the bench scripts (sourced, not run): the release server on 127.0.0.1 with OS-picked
# ports, and one perf_analyzer measurement. Callers set ROOT and OUT and have run
# `eval "$(bash scripts/setup.sh --clients)"`.
SERVER="$ROOT/target/release/kubemaas-server"

run_server() { # server flags... -> sets PID, PORT (HTTP) and GRPC_PORT
  "$SERVER" --log-format json serve --host 127.0.0.1 --http-port 0 --grpc-port 0 --metrics-port 0 \
    --ort-library "$ORT_DYLIB_PATH" "$@" 2> "$OUT/server.log" &
  PID=$!
  for _ in $(seq 300); do
    PORT="$(sed -n 's/.*"message":"listening".*"http":"127.0.0.1:\([0-9]*\)".*/\1/p' "$OUT/server.log" | head -n1)"
    GRPC_PORT="$(sed -n 's/.*"message":"listening".*"grpc":"127.0.0.1:\([0-9]*\)".*/\1/p' "$OUT/server.log" | head -n1)"
    [ -n "$PORT" ] && curl -sf "127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not start: $(cat "$OUT/server.log")" >&2
  exit 1
}

stop_server() { # PID 0 is "none": `kill 0` would signal the whole process group (make included)
  if [ "${PID:-0}" -gt 0 ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=0
}

measure() { # label model concurrency perf_analyzer-args... -> "throughput p99_us"
  local label="$1" model="$2" c="$3"
  shift 3
  "$ROOT/scripts/perf_analyzer" -m "$model" "$@" \
    --concurrency-range "$c:$c" --measurement-mode count_windows --measurement-request-count 400 \
    --stability-percentage 25 --max-trials 10 --percentile 99 > "$OUT/$label-$c.txt" 2>&1 || {
      echo "perf_analyzer failed ($label, concurrency $c):" >&2; tail -5 "$OUT/$label-$c.txt" >&2; echo "0 0"; return; }
  local tput p99
  tput="$(sed -n "s/^Concurrency: $c, throughput: \([0-9.]*\) infer\/sec.*/\1/p" "$OUT/$label-$c.txt" | tail -n1)"
  p99="$(sed -n 's/^ *p99 latency: \([0-9]*\) usec.*/\1/p' "$OUT/$label-$c.txt" | tail -n1)"
  echo "${tput:-0} ${p99:-0}"
}

ms() { awk -v x="$1" 'BEGIN { printf "%.1f", x / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "n/a" }'; }
