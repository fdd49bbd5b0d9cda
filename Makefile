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

.PHONY: run test install proto proto-check proto-breaking lint sdk-env clean

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
# deploy/nginx.conf in front of real replicas) and Debian's chromium
# (tests/e2e/test_browser.py drives it headless with Playwright; never
# `playwright install`, which downloads a browser build). apt-get runs only when
# something is missing, with one `apt-get update`.
.PHONY: system-deps
system-deps:
	@missing=""; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	test -x /usr/bin/chromium || missing="$$missing chromium fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
	  apt-get update && apt-get install -y --no-install-recommends $$missing; \
	fi

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

# The upstream contract may only grow: `buf breaking` compares proto/ with the image
# of the contract as last released, kept in the repository (no git history needed, so
# a shallow clone checks the same). A field renumbered, renamed or removed fails.
# To roll the baseline forward once a contract is released (after review, on purpose):
#   node_modules/.bin/buf build -o $(PROTO_BASELINE)
# and commit the new image with the release.
PROTO_BASELINE := proto-baseline/kernel_events_v1.binpb

proto-breaking: node_modules/.bin/buf
	node_modules/.bin/buf breaking proto --against $(PROTO_BASELINE)

lint: install node_modules/.bin/buf proto-breaking
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint

clean:
	rm -rf $(VENV) $(SDK_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache

# Benchmarks against real peers (docs/benchmarks.md); never part of `make test`.
# Bench-only Python packages come from the `bench` extra; nginx and its nchan module
# (system 4) are installed only when missing. Extra options: BENCH_ARGS="--systems proxy".
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

.PHONY: bench bench-quick bench-deps
bench-deps: $(BENCH_STAMP)
	@missing=""; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	test -f /usr/lib/nginx/modules/ngx_nchan_module.so || missing="$$missing libnginx-mod-nchan"; \
	if [ -n "$$missing" ]; then \
	  apt-get update && apt-get install -y --no-install-recommends $$missing; \
	fi

bench: bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: bench-deps
	$(PY) -m bench.run --quick $(BENCH_ARGS)
