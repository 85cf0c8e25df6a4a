# The two commands in the README: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest test-postgres emulator bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchd demo

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check batchd tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy batchd

# -rs prints why each skipped test was skipped: a PostgreSQL tier with no server says so loudly.
pytest: $(STAMP)
	$(BIN)/pytest -q -rs

# The PostgreSQL tier alone, against BATCHD_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test);
# here a missing server fails instead of skipping.
test-postgres: $(STAMP)
	BATCHD_REQUIRE_POSTGRES_TIER=1 $(BIN)/pytest -q -rs tests/test_postgres_engine.py $(wildcard tests/store)

emulator: $(STAMP)
	$(BIN)/batchd emulator --host 127.0.0.1 --port 8089

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
