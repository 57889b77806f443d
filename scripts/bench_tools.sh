#!/usr/bin/env bash
# What `make bench` needs beyond `setup.sh --test`, cached by version under ~/.cache/kubemaas/bench:
# KServe 0.21 and MLServer 1.7 (each in its own virtualenv with the same onnxruntime as the tests),
# hey (the HTTP load generator, built from Go modules) and matplotlib in the project's .venv (PNG).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}/bench"
ORT="onnxruntime==1.31.1"
mkdir -p "$BENCH"
venv() { # dir packages...
  local dir="$BENCH/$1"; shift
  [ -f "$dir/.complete" ] && return 0
  rm -rf "$dir"
  echo "installing $* into $dir" >&2
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q "$@"
  touch "$dir/.complete"
}
venv kserve-0.21.0 "kserve==0.21.0" "$ORT" numpy
# MLServer 1.7.1's worker processes call asyncio.get_event_loop(), which uvloop 0.22 turned into an error.
venv mlserver-1.7.1 "mlserver==1.7.1" "uvloop<0.22" "$ORT" numpy
if [ ! -x "$BENCH/hey-v0.1.4/hey" ]; then
  echo "building hey v0.1.4" >&2
  GOBIN="$BENCH/hey-v0.1.4" go install github.com/rakyll/hey@v0.1.4
fi
# The project's virtualenv (numpy, onnxruntime) comes from setup.sh --test, which make bench runs next.
eval "$(bash "$ROOT/scripts/setup.sh" --test)"
"$KUBEMAAS_VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$KUBEMAAS_VENV/bin/pip" install -q "matplotlib==3.10.8"
echo "KUBEMAAS_BENCH=$BENCH"
