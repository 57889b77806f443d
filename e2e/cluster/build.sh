#!/usr/bin/env bash
# Builds the Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler),
# etcd and kwok/kwokctl from Go modules, into a cache keyed by version. Only the first run is slow.
# Prints the directory holding the binaries.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
STAGING_VERSION="v0${K8S_VERSION#v1}"          # v1.37.2 -> v0.37.2
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
CACHE="${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}"
OUT="$CACHE/k8s/$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION"
log() { printf 'cluster-build: %s\n' "$*" >&2; }

want=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok kwokctl)
missing=0
for b in "${want[@]}"; do [ -x "$OUT/$b" ] || missing=1; done
if [ "$missing" = 0 ]; then echo "$OUT"; exit 0; fi

mkdir -p "$OUT"
WORK="$(mktemp -d)"
HEARTBEAT=""
trap 'rm -rf "$WORK"; [ -z "$HEARTBEAT" ] || kill "$HEARTBEAT" 2>/dev/null' EXIT
BUILD_START="$(date +%s)"

# `timed NAME COMMAND...`: runs a slow step, saying every 30 s that it is still going, then how long
# it took (a cold Kubernetes build is silent for minutes otherwise).
timed() {
  local name="$1" start
  shift
  start="$(date +%s)"
  log "$name: started"
  ( while sleep 30; do log "$name: still going, $(( $(date +%s) - start )) s"; done ) &
  HEARTBEAT=$!
  "$@"
  kill "$HEARTBEAT" 2>/dev/null || true
  HEARTBEAT=""
  log "$name: done in $(( $(date +%s) - start )) s (total $(( $(date +%s) - BUILD_START )) s)"
}
export GOFLAGS="-mod=mod" CGO_ENABLED=0

# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths;
# outside its repository every one of them must be pinned to the matching published version.
log "resolving k8s.io/kubernetes $K8S_VERSION"
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
mods="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | sort -u)"

mkdir -p "$WORK/k8s"
cd "$WORK/k8s"
go mod init kubemaas.io/e2e/k8s >/dev/null 2>&1
{
  echo "require k8s.io/kubernetes $K8S_VERSION"
  for m in $mods; do echo "replace $m => $m $STAGING_VERSION"; done
} >> go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
timed "downloading modules" go mod tidy >&2
for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
  if [ ! -x "$OUT/$cmd" ]; then
    timed "building $cmd" go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${STAGING_VERSION#v0.}" -o "$OUT/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
  fi
done

if [ ! -x "$OUT/etcd" ]; then
  # `go install ...@version` refuses etcd's module (it has replace directives); building it as a
  # dependency of a module of ours is fine.
  mkdir -p "$WORK/etcd" && cd "$WORK/etcd"
  go mod init kubemaas.io/e2e/etcd >/dev/null 2>&1
  timed "downloading etcd $ETCD_VERSION" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  timed "building etcd $ETCD_VERSION" go build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3 >&2
fi
for tool in kwok kwokctl; do
  if [ ! -x "$OUT/$tool" ]; then
    GOBIN="$OUT" timed "building $tool $KWOK_VERSION" go install "sigs.k8s.io/kwok/cmd/$tool@$KWOK_VERSION" >&2
  fi
done
for b in "${want[@]}"; do [ -x "$OUT/$b" ] || { log "missing $b after build"; exit 1; }; done
echo "$OUT"
