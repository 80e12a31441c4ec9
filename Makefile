# The two commands of the README: `make demo` and `make test`.
# Both create ./.venv on first use and reinstall when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-crawl services

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/geoscrape demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Most tests wait on processes and services, so 4 workers overlap their waits
# on 2 cores; every test makes its own vhost, database, Redis prefix and ports.
# The tests that count requests per second at a site, and the beat's, which
# bound when a tick fires (marked `timing`), run after them, alone: on a machine
# the other workers keep busy, a request held up on its way from its slot to the
# socket lands in the next second, and a tick or its store write comes late.
# `pytest` alone (one file, one test) runs in one process.
PYTEST_WORKERS ?= 4

test: lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not timing"
	$(BIN)/pytest -m timing

services:
	bash scripts/services.sh

# 1M observations into a fresh PostgreSQL db (dropped after): query latency, export memory.
bench: $(VENV)/.installed
	$(BIN)/python -m bench.query_bench

# geoscrape vs bare Scrapy on a generated 2,000-page site (nginx), distributed
# runs, one-page latency, ingest and the shared rate budget (docs/PERFORMANCE.md).
bench-crawl: $(VENV)/.installed
	$(BIN)/python -m bench.crawl_bench
