# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv and register the bundled sample case
#   make test   set up .venv (with test extras) and run lint + the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test setup setup-test lint benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"

demo: setup
	$(BIN)/srr-register --sample --out out/sample

lint: setup-test
	$(BIN)/ruff check .

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

benchmark: setup-test
	$(BIN)/srr-benchmark --cases 10 --out docs/benchmark

clean:
	rm -rf $(VENV) out build *.egg-info
