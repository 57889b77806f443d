#!/usr/bin/env bash
# `make e2e`: builds what is missing, starts the control plane, runs the end-to-end suite, and stops
# everything afterwards — also after a failure, when the component logs are printed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
eval "$(bash scripts/setup.sh --test)"
export KUBECTL="$KUBEMAAS_VENV/bin/kubectl" ORT_DYLIB_PATH KUBEMAAS_MODELS KUBEMAAS_HELM
cargo build -p kubemaas-operator -p kubemaas-server -p kubemaas-e2e --tests --bins >&2

status=0
cleanup() {
  if [ "$status" != 0 ] && [ -n "${KUBEMAAS_E2E_LOGS:-}" ]; then
    for f in "$KUBEMAAS_E2E_LOGS"/*.log target/e2e/operator-*.log; do
      [ -f "$f" ] || continue
      echo "===== last lines of $f" >&2
      tail -n 30 "$f" >&2
    done
  fi
  bash e2e/cluster/down
}
trap cleanup EXIT
eval "$(bash e2e/cluster/up)"
export KUBECONFIG KUBEMAAS_E2E_LOGS KUBEMAAS_E2E_AUDIT_LOG KUBEMAAS_E2E_STATE
cargo test -p kubemaas-e2e ${E2E_TEST:+--test "$E2E_TEST"} -- ${E2E_FILTER:-} ${E2E_IGNORED:+--ignored} --test-threads "${E2E_THREADS:-3}" --nocapture || status=$?
exit "$status"
