# Set-up lives here so that a fresh clone needs only `make demo` or `make test`.
# TORCH pins the CPU build that this machine serves from local disk; on a GPU box use
# `make demo TORCH=torch` to get the CUDA build from PyPI instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-train clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gptkit demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench-train: $(STAMP)
	$(BIN)/python bench/train_shakespeare_char.py

clean:
	rm -rf $(VENV) gptkit-demo
