# `make serve` and `make test` work on a fresh machine with Python 3.11+ and make: the first
# time, each creates .venv and installs what it needs into it. `make serve`: chatbus alone
# (add litellm with `.venv/bin/pip install -e '.[litellm]'`); `make test`: chatbus with its
# test extra (pytest, ruff, mypy, litellm, openai, SecantusDB, ...) and the example plugin.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
# Everything `make test`, `make lint` and `make bench` need (serving's install, and more).
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench bench-store clean

serve: $(SERVE_STAMP)
	$(BIN)/chatbus serve

test: $(STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench

# The history stores at 10k, 100k and 1M turns (bench/results/store.md); --quick: 10k only.
bench-store: $(STAMP)
	$(BIN)/python -m bench.store

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "chatbus needs Python 3.11+")'
	@echo "make: creating $(VENV), a virtual environment for chatbus"
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	@echo "make: installing chatbus and what serving needs into $(VENV) (about a minute the first time)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP): $(SERVE_STAMP) pyproject.toml examples/chatbus-provider-example/pyproject.toml
	@echo "make: installing the test tools and the example plugin into $(VENV) (about a minute the first time)"
	$(BIN)/python -m pip install --quiet -e '.[test]' -e examples/chatbus-provider-example
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
