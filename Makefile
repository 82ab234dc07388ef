# The Makefile is the interface: every target bootstraps the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DB     ?= opa-telemetry.db
HOST   ?= 127.0.0.1
PORT   ?= 9181

.PHONY: run test lint fmt bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras, remade whenever the package description changes.
$(VENV)/.stamp-run: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,fast]'
	touch $@

$(VENV)/.stamp-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,fast,test]'
	touch $@

$(VENV)/.stamp-lint: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,fast,test,lint]'
	touch $@

$(VENV)/.stamp-bench: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server,fast,loadtest,postgres,test]'
	touch $@

run: $(VENV)/.stamp-run
	$(BIN)/opa-telemetry-server serve --host $(HOST) --port $(PORT) --db $(DB) $(ARGS)

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p build/typecheck
	ln -sfn ../../client build/typecheck/opa_telemetry
	ln -sfn ../../server build/typecheck/opa_telemetry_server
	$(BIN)/mypy

# Side-by-side throughput and latency, bare aiohttp vs the real server (a few minutes).
bench: $(VENV)/.stamp-bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)

fmt: $(VENV)/.stamp-lint
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
