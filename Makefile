# The two commands: `make run` and `make test`. Everything else is set up on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SDK_VENV ?= .venv-sdk
SDK_STAMP := $(SDK_VENV)/.installed
PB_OUT := proxy/_pb
PROTOS := $(shell find proto -name '*.proto')

.PHONY: run test install proto proto-check lint sdk-env clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# The official Backend.AI client SDK lives in its own environment: its pins
# (aiohttp~=3.8, yarl<1.10, ...) clash with ours.
$(SDK_STAMP):
	test -x $(SDK_VENV)/bin/python || $(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install -q --upgrade pip
	$(SDK_VENV)/bin/python -m pip install -q 'backend.ai-client==23.9.10' 'yarl==1.9.4'
	touch $@

sdk-env: $(SDK_STAMP)

run: install
	$(VENV)/bin/kernel-events-proxy serve --demo

# System packages the tests need: nginx (tests/e2e/test_scale_out.py runs
# deploy/nginx.conf in front of real replicas). apt-get runs only when it is missing.
.PHONY: system-deps
system-deps:
	command -v nginx >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nginx)

test: system-deps install sdk-env
	KEP_SDK_PYTHON=$(abspath $(SDK_VENV))/bin/python $(VENV)/bin/pytest

# Regenerate the protobuf/gRPC modules. grpcio-tools emits absolute imports
# (`from kernel_events.v1 import ...`); they are rewritten to package-relative ones.
proto: install
	PB_OUT=$(PB_OUT) PY=$(PY) bash scripts/gen-proto.sh

# Fails when the checked-in generated code differs from what `make proto` makes.
proto-check: install
	tmp=$$(mktemp -d) && PB_OUT=$$tmp PY=$(PY) bash scripts/gen-proto.sh && \
	  diff -ru --exclude=__pycache__ $(PB_OUT) $$tmp && rm -rf $$tmp

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

lint: install node_modules/.bin/buf
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint

clean:
	rm -rf $(VENV) $(SDK_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
