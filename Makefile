# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster

.PHONY: demo test acceptance check test-fast lint lint-fix dev bench bench-quick install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[test,celery]'
	touch $(STAMP)

# the linters: a stamp of their own, so `make test` does not install them
LINT_STAMP := $(VENV)/.installed-lint
$(LINT_STAMP): $(STAMP)
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[test,celery,lint]'
	touch $(LINT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/billing demo

# the suite without the acceptance tier, on every core (pytest-xdist: tests that share a fixture run on
# one worker), then the 15 slowest
test: $(STAMP)
	$(BIN)/python -m compileall -q billing_dags tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=15 -m "not acceptance"

# the acceptance tier: whole months end to end against real servers, the Dagster UI, a browser, the benchmarks
acceptance: $(STAMP)
	$(BIN)/python -m compileall -q billing_dags tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=15 -m acceptance

# what CI runs: the linters, then both tiers
check: lint test acceptance

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# ruff (lint + format) and sqlfluff, configured in pyproject.toml; CI runs this before the tests
lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/sqlfluff lint sql_models

# applies what the linters can fix by themselves; review the diff, then `make lint`
lint-fix: $(LINT_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/sqlfluff fix sql_models

dev: $(STAMP)
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml || true
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# every benchmark, one table (benchmarks/README.md): the standard workloads (by hand; workloads cached in benchmarks/out) / a smoke run at small sizes
bench: $(STAMP)
	$(BIN)/python -m benchmarks --full

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf data .dagster
