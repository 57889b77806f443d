# KubeMaaS. `make help` lists the targets. The README's main commands are `make run`, `make test` and `make demo`.
SHELL := /bin/bash
CARGO ?= cargo
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
SETUP := scripts/setup.sh
PREFIX ?= $(HOME)/.cargo

.PHONY: bench bench-shm bench-rss gpu-pack help setup run demo client-tools install images bench-batching bench-protocols bench-compress fuzz test test-rust test-python e2e scale faults lint fmt build manifests

help: ## List the targets.
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: ## Fetch what is not committed (ONNX Runtime library, real models) into ~/.cache/kubemaas.
	@bash $(SETUP) >/dev/null

build: ## Build the workspace (debug).
	$(CARGO) build --workspace --lib --bins --examples

run: setup ## Build the server (release, server crate only) and serve the bundled models on 127.0.0.1:8080 (Ctrl-C stops it).
	$(CARGO) build --release -p kubemaas-server
	@bash scripts/quickstart.sh

demo: ## The operator on one machine: local control plane, operator, real servers behind fake pods, a ModelDeployment with live metrics (Ctrl-C stops it; DEMO_ONESHOT=1 exits after printing).
	@bash scripts/demo.sh

client-tools: ## Install the README's clients: numpy and tritonclient into .venv, perf_analyzer (run it as scripts/perf_analyzer).
	@bash $(SETUP) --clients >/dev/null
	@printf 'Python clients: %s/bin/python; perf_analyzer: scripts/perf_analyzer\n' "$(VENV)"

install: ## Build kubemaas-server and kubemaas-operator (release) and copy them into $(PREFIX)/bin (default ~/.cargo/bin).
	$(CARGO) build --release --locked -p kubemaas-server -p kubemaas-operator
	install -d "$(PREFIX)/bin"
	install -m 0755 target/release/kubemaas-server target/release/kubemaas-operator "$(PREFIX)/bin/"
	@printf 'installed into %s/bin; the server finds ONNX Runtime in ~/.cache/kubemaas (make setup) or via --ort-library\n' "$(PREFIX)"

images: setup ## Build the container images as OCI archives in target/images (release binaries, no container engine) and print their sizes.
	$(CARGO) build --release -p kubemaas-server -p kubemaas-operator
	@eval "$$(bash $(SETUP))"; python3 images/build.py --bin-dir target/release --ort-library "$$ORT_DYLIB_PATH" --out target/images

lint: ## rustfmt and clippy, warnings are errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: ## Unit and mocked-apiserver tests (the e2e crate needs a cluster: see `make e2e`).
	$(CARGO) test --workspace --exclude kubemaas-e2e

test-python: build ## Integration tests: the real server binary, real models, real clients.
	@eval "$$(bash $(SETUP) --test)"; export ORT_DYLIB_PATH KUBEMAAS_PERF_ANALYZER KUBEMAAS_PERF_ANALYZER_LIBS KUBEMAAS_HELM KUBEMAAS_FAKE_GCS KUBEMAAS_ONNX_TESTDATA; \
	$(PY) -m pytest tests -v -rs --durations=10

e2e: ## End-to-end suite on a real control plane built from Go modules (first build is slow, then cached).
	bash e2e/run.sh

scale: ## Scale check, outside `make test`: 1,000 ModelDeployments on a fresh control plane reach Ready; the operator's peak RSS must stay under 128 MiB.
	E2E_TEST=scale KUBEMAAS_SCALE_COUNT=$${KUBEMAAS_SCALE_COUNT:-1000} KUBEMAAS_SCALE_MAX_RSS_MIB=$${KUBEMAAS_SCALE_MAX_RSS_MIB:-128} bash e2e/run.sh

faults: ## The fault test alone (it is part of make e2e): 50 ModelDeployments converge through injected 409s, 5xx, cut watches and 410s.
	E2E_TEST=change E2E_FILTER=fifty_model_deployments bash e2e/run.sh

bench: setup ## Benchmark, outside make test: kubemaas-server (binary/JSON, batching off/on) vs in-process ONNX Runtime, KServe 0.21, MLServer 1.7 and a hello-world hyper server; cls/det/MiniLM/dense and a 1 MiB payload at 1/4/16/64 clients (hey); table into docs/benchmarks.md, PNG in target/bench (BENCH_ARGS="--models dense --seconds 2" for a quick run).
	bash scripts/bench_tools.sh
	cargo build --release -q -p kubemaas-server --bin kubemaas-server --example hello
	eval "$$(bash scripts/setup.sh --test)" && ORT_DYLIB_PATH="$$ORT_DYLIB_PATH" "$$KUBEMAAS_VENV/bin/python" scripts/bench.py $(BENCH_ARGS)

gpu-pack: setup ## Pack the GPU benchmark (server, ort_probe, models, perf_analyzer, ONNX Runtime's CUDA build) into .gpu/p0..p3 for a GPU machine that cannot download; docs/gpu.md says how to run it there.
	bash scripts/gpu_pack.sh

bench-rss: setup ## Benchmark, outside make test: kubemaas-server's RSS sampled every 15 s over 5 minutes of 64 clients on PP-OCR cls (RSS_ARGS="--batching" for batching on); prints the spread around the median, also split into mimalloc's arenas, other anonymous memory (ONNX Runtime) and files.
	bash scripts/bench_tools.sh
	cargo build --release -q -p kubemaas-server --bin kubemaas-server
	eval "$$(bash scripts/setup.sh --test)" && ORT_DYLIB_PATH="$$ORT_DYLIB_PATH" "$$KUBEMAAS_VENV/bin/python" scripts/bench_rss.py $(RSS_ARGS)

bench-batching: setup ## Benchmark, outside make test: dynamic batching off vs on (release server, ocr-cls, perf_analyzer at 1/4/16/64 clients); prints a table.
	bash scripts/bench_batching.sh

bench-shm: setup ## Benchmark, outside make test: binary tensors vs Triton's system shared memory (perf_analyzer --shared-memory system) vs ONNX Runtime in-process; det/cls/1 MiB at 1/4 clients; prints a table (SHM_ARGS="--models det --clients 4").
	cargo build --release -q -p kubemaas-server
	eval "$$(bash scripts/setup.sh --test)" && ORT_DYLIB_PATH="$$ORT_DYLIB_PATH" "$$KUBEMAAS_VENV/bin/python" scripts/bench_shm.py $(SHM_ARGS)

bench-protocols: setup ## Benchmark, outside make test: REST vs gRPC unary vs gRPC streaming (release server, row-stats and ocr-cls, perf_analyzer at 1/8 clients); prints a table.
	bash scripts/bench_protocols.sh

bench-compress: setup ## Benchmark, outside make test: compress int8-dynamic and fp16 vs onnxruntime quantize_dynamic on the OCR models (size, cosine on rendered text, latency); prints a table.
	cargo build --release -q -p kubemaas-server
	eval "$$(bash scripts/setup.sh --test)" && "$$KUBEMAAS_VENV/bin/python" scripts/bench_compress.py target/release/kubemaas-server "$$KUBEMAAS_MODELS"

fuzz: ## Fuzz, outside make test: the V2/V1 decoders, the binary extension and the REST router, FUZZ_SECONDS (60) each (cargo-fuzz on stable; the first build takes ~20 min); fails on a crash, printing the reproducer.
	bash scripts/fuzz.sh

test: setup lint test-rust test-python e2e ## Everything CI runs: installs what is missing, then lint, unit, integration and e2e tests.

manifests: ## Regenerate committed files: the CRD, the chart's CRD copy and deploy/base/install.yaml.
	$(CARGO) run -q -p kubemaas-crds --bin crdgen
	cp crds/generated/modeldeployments.kubemaas.io.yaml charts/kubemaas/files/
	@eval "$$(bash $(SETUP) --test)"; "$$KUBEMAAS_HELM" template kubemaas charts/kubemaas -n kubemaas-system \
	  | sed -e '1i # Generated by `make manifests` from charts/kubemaas (helm template, default values); do not edit.' > deploy/base/install.yaml

fmt: ## Format the code.
	$(CARGO) fmt --all
