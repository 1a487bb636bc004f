# The project's entry points. `make demo` and `make test` set everything up on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo replay test test-fast lint stack-up stack-down bench-engine

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

## The main job on the local stack: servers, Dagster (UI + daemon), the simulated upload stream.
demo: setup
	scripts/demo simulate $(ARGS) || [ $$? -eq 130 ]  # Ctrl-C is how a demo ends

## The same pipeline fed with the real New York check-ins in ../shared/data.
replay: setup
	scripts/demo replay $(ARGS) || [ $$? -eq 130 ]

## Start the stack, lint, run every test against the real servers, stop what was started.
test: setup
	scripts/run-tests

## Everything but the soak tests marked slow.
test-fast: setup
	scripts/run-tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

stack-up: setup
	scripts/stack up

stack-down:
	scripts/stack down

bench-engine: setup
	$(PY) bench/engine_bench.py

## End-to-end benchmarks on the running local stack (BENCHMARKS.md); ARGS passes options through.
.PHONY: bench-limit bench-stream bench-latency bench-backfill bench-growth
bench-limit: setup
	source scripts/env.sh && $(PY) -m bench.pipeline.limit $(ARGS)

bench-stream: setup
	source scripts/env.sh && $(PY) -m bench.pipeline.stream $(ARGS)

bench-latency: setup
	source scripts/env.sh && $(PY) -m bench.pipeline.latency $(ARGS)

bench-backfill: setup
	source scripts/env.sh && $(PY) -m bench.pipeline.backfill $(ARGS)

bench-growth: setup
	source scripts/env.sh && $(PY) -m bench.pipeline.growth $(ARGS)
