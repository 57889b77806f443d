#!/usr/bin/env bash
# `make demo`: the operator's whole job on one machine, without a cluster. Starts a local control
# plane (real etcd, kube-apiserver, scheduler and controller-manager, kwok's fake nodes; built from
# Go modules the first time, then cached), the operator, and a pod runner that puts a real
# kubemaas-server behind every fake pod. Applies a ModelDeployment, waits for Ready, sends
# predictions to the pods and prints `kubectl get mdep -o wide` with live metrics. Then it leaves
# everything running until Ctrl-C. DEMO_ONESHOT=1: print, then tear down and exit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
say() { printf '\n==> %s\n' "$*"; }

say "setup: ONNX Runtime, kubectl (cached in ~/.cache/kubemaas after the first run)"
eval "$(bash scripts/setup.sh --test)"
export KUBECTL="$KUBEMAAS_VENV/bin/kubectl" ORT_DYLIB_PATH
say "building the operator, the server and the pod runner (debug)"
cargo build -q -p kubemaas-operator -p kubemaas-server -p kubemaas-e2e --bins

export KUBEMAAS_E2E_CLUSTER=kubemaas-demo KUBEMAAS_E2E_STATE="$ROOT/target/demo"
mkdir -p "$KUBEMAAS_E2E_STATE"
NS=demo
pids=()
teardown() {
  say "tearing down"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash e2e/cluster/down
}
trap teardown EXIT

say "starting the control plane (the first run builds it from Go modules: many minutes; then seconds)"
eval "$(bash e2e/cluster/up)"
export KUBECONFIG
k() { "$KUBECTL" "$@"; }
k apply -f crds/generated/modeldeployments.kubemaas.io.yaml >/dev/null
# Polled rather than `kubectl wait`: for a moment after the apply the CRD's status.conditions is
# null, and `kubectl wait` then fails at once ("accessor error: <nil>") instead of waiting.
for _ in $(seq 1 120); do
  established=$(k get crd modeldeployments.kubemaas.io \
    -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null || true)
  [ "$established" = True ] && break
  sleep 0.5
done
[ "$established" = True ] || { echo "the ModelDeployment CRD was not established within 60 s" >&2; exit 1; }
k create namespace "$NS" >/dev/null

say "starting the operator (scrapes pod metrics every 5 s) and the pod runner"
LOGS="$KUBEMAAS_E2E_STATE/logs"
mkdir -p "$LOGS"
target/debug/kubemaas-operator run --watch-namespace "$NS" --leader-elect false \
  --metrics-addr 127.0.0.1:0 --metrics-interval 5 >"$LOGS/operator.log" 2>&1 &
pids+=($!)
target/debug/kubemaas-podrunner --namespace "$NS" --server target/debug/kubemaas-server \
  --work "$KUBEMAAS_E2E_STATE/pods" --file-store "$ROOT/models" >"$LOGS/podrunner.out" 2>"$LOGS/podrunner.log" &
pids+=($!)
for _ in $(seq 1 50); do grep -q FILE_STORE= "$LOGS/podrunner.out" 2>/dev/null && break; sleep 0.1; done
STORE="$(sed -n 's/^FILE_STORE=//p' "$LOGS/podrunner.out")"
[ -n "$STORE" ] || { echo "demo: the pod runner did not start: $(cat "$LOGS/podrunner.log")" >&2; exit 1; }

say "applying a ModelDeployment: 2 replicas of row-stats, pulled over HTTP from $STORE"
cat <<YAML | tee "$KUBEMAAS_E2E_STATE/row-stats.yaml" | k apply -n "$NS" -f - >/dev/null
apiVersion: kubemaas.io/v1alpha1
kind: ModelDeployment
metadata:
  name: row-stats
spec:
  model:
    uri: $STORE/row-stats/1/model.onnx
    allowPrivateAddresses: true   # the demo's store is on 127.0.0.1
  replicas: 2
YAML
sed 's/^/    /' "$KUBEMAAS_E2E_STATE/row-stats.yaml"
k wait -n "$NS" --for=condition=Ready mdep/row-stats --timeout=180s
mapfile -t IPS < <(k get pods -n "$NS" -l kubemaas.io/model-deployment=row-stats -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}')
echo "pods at ${IPS[*]}"

say "predicting on each pod (KServe V2 JSON)"
REQ='{"inputs":[{"name":"x","shape":[2,10],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]}]}'
for ip in "${IPS[@]}"; do
  for _ in $(seq 1 60); do curl -sf -o /dev/null "http://$ip:8080/v2/health/ready" && break; sleep 0.5; done
  printf '%s: ' "$ip"
  curl -sS -X POST "http://$ip:8080/v2/models/row-stats/infer" -d "$REQ"
  echo
done

say "sending traffic for 15 s; after 12 s, the status the operator wrote from the pods' own metrics"
end=$((SECONDS + 15))
load=()
for ip in "${IPS[@]}"; do
  ( while [ $SECONDS -lt $end ]; do curl -s -o /dev/null -X POST "http://$ip:8080/v2/models/row-stats/infer" -d "$REQ"; done ) &
  load+=($!)
done
sleep 12
# The table and status.metrics come from two reads; the operator may write new metrics in between.
# Read until the scrape time is the same before and after, so both show the same numbers.
scraped() { k get mdep -n "$NS" row-stats -o jsonpath='{.status.metrics.lastScrapeTime}'; }
for _ in $(seq 1 10); do
  before="$(scraped)"
  table="$(k get mdep -n "$NS" -o wide)"
  status="$(k get mdep -n "$NS" row-stats -o jsonpath='status.metrics: {.status.metrics}{"\n"}status.model.inputs: {.status.model.inputs}{"\n"}')"
  [ "$before" = "$(scraped)" ] && break
done
printf '%s\n\n%s\n' "$table" "$status"
for p in "${load[@]}"; do wait "$p" || true; done

if [ "${DEMO_ONESHOT:-}" = 1 ]; then
  exit 0
fi
say "everything keeps running. Try:
    export KUBECONFIG=$KUBECONFIG
    $KUBECTL get mdep -n $NS -o wide -w
    $KUBECTL scale mdep/row-stats -n $NS --replicas 3
    curl -s -X POST http://${IPS[0]}:8080/v2/models/row-stats/infer -d '$REQ'
  Ctrl-C stops it all."
while true; do sleep 3600; done
