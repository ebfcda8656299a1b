# README command 1: `make run` (the embedded grid -> leaderboards); command 2: `make test`.
# Both work in a project virtual environment (.venv, ignored by git) created with the first
# Python >= 3.11 on the PATH, so a PEP 668 system interpreter is never installed into.
# PYTHON=/path/to/python picks the interpreter that creates it; `make clean-env` removes it.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test clean-env

setup:
	@VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(PY) -m vlmbackdoor_bench.cli run

test: setup
	$(PY) -m pytest -q

clean-env:
	rm -rf $(VENV)
