# sdserve: `make demo` and `make test` are the two set-up commands on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv install deps gen check-gen check-breaking lint typecheck test test-fast demo bench eval clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 resolves to the CPU wheel on disk here; elsewhere pip takes it from PyPI (see README for CUDA).
# Two distributions, both editable and from this checkout in one pip call: the client `sdserve` (clients/python)
# and the server `sdserve-server` (the root, with the dev tools), whose `sdserve` requirement then resolves to
# clients/python, never to an index.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ./clients/python -e '.[dev]'
	touch $@

venv install: $(VENV)/.installed

# System tools for the tests (promtool, openssl, prlimit) and the TypeScript/Go client toolchains.
deps:
	scripts/install_test_deps.sh

gen: install deps
	scripts/gen.sh
	$(BIN)/python scripts/gen_config_docs.py
	$(BIN)/python -m tests.test_deploy --write-prometheusrule

check-gen: install deps
	scripts/check_gen.sh

check-breaking: install
	scripts/check_breaking.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: install
	$(BIN)/mypy service model_manager sdserve_core clients/python/sdserve tests training quality bench

# Two pytest workers (each test file stays on one), one torch thread each (tests/conftest.py).
test: install deps check-gen check-breaking lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

demo: install
	scripts/demo.sh

bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.adapters
	$(BIN)/python -m bench.roofline

eval: install
	$(BIN)/python -m quality

clean:
	rm -rf $(VENV) demo-out .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info clients/python/*.egg-info

# The playground page: bundles clients/typescript/playground into service/web (committed, so a server install needs
# no Node; tests/test_playground_bundle.py fails when it is stale). Needs clients/typescript/node_modules
# (scripts/install_client_toolchains.sh).
.PHONY: web
web:
	cd clients/typescript && npm run build:playground
