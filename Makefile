# TheRelay Agent — the two commands of the README:
#   make run    set up and run the agent on its embedded defaults
#   make test   set up and run lint, type checks and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test check bench setup setup-test clean

run: setup
	$(BIN)/therelay-agent run

test: setup-test check
	$(BIN)/python -m pytest

check: setup-test
	$(BIN)/ruff check agent tests
	$(BIN)/mypy

bench: setup-test
	$(BIN)/python tests/bench/bench_authorize.py

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# System packages first (only what is missing; sudo when not root), then the venv.
$(VENV)/.installed: pyproject.toml scripts/setup-system
	scripts/setup-system
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
