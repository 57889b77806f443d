# KubeMaaS. `make help` lists the targets. The README's two commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
SETUP := scripts/setup.sh

.PHONY: help setup run test test-rust test-python e2e lint fmt build

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## Fetch what is not committed (ONNX Runtime library, real models) into ~/.cache/kubemaas.
	@bash $(SETUP) >/dev/null

build: ## Build the workspace (debug).
	$(CARGO) build --workspace

run: setup build ## Start the server on the bundled OCR model (Ctrl-C stops it) and print a curl example.
	@eval "$$(bash $(SETUP))"; \
	printf '\nServer on http://127.0.0.1:8080 serving the bundled model "ocr-cls". Try, once it is ready:\n'; \
	printf '  curl -s localhost:8080/v2/models/ocr-cls\n'; \
	printf '  python3 -c %s | curl -s -X POST localhost:8080/v2/models/ocr-cls/infer -d @-\n\n' \
	  "'import json; print(json.dumps({\"inputs\":[{\"name\":\"x\",\"shape\":[1,3,48,192],\"datatype\":\"FP32\",\"data\":[0.5]*(3*48*192)}]}))'"; \
	exec ./target/debug/kubemaas-server serve --model-repository "$$KUBEMAAS_QUICKSTART_REPOSITORY" \
	  --ort-library "$$ORT_DYLIB_PATH" --http-port 8080 --metrics-port 9090

lint: ## rustfmt and clippy, warnings are errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: ## Unit and mocked-apiserver tests (the e2e crate needs a cluster: see `make e2e`).
	$(CARGO) test --workspace --exclude kubemaas-e2e

test-python: build ## Integration tests: the real server binary, real models, real clients.
	@eval "$$(bash $(SETUP) --test)"; export ORT_DYLIB_PATH KUBEMAAS_PERF_ANALYZER KUBEMAAS_PERF_ANALYZER_LIBS KUBEMAAS_HELM; \
	$(PY) -m pytest tests -v -rs --durations=10

e2e: ## End-to-end suite on a real control plane built from Go modules (first build is slow, then cached).
	bash e2e/run.sh

test: setup lint test-rust test-python e2e ## Everything CI runs: installs what is missing, then lint, unit, integration and e2e tests.

fmt: ## Format the code.
	$(CARGO) fmt --all
