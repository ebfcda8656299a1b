# README command 1: `make run` (the embedded grid -> leaderboards); command 2: `make test`.
PYTHON ?= python3
# cells in parallel worker processes (vbb run --jobs; README "Running cells in parallel")
JOBS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test ci-grid

setup:
	@PYTHON=$(PYTHON) bash scripts/setup.sh

run: setup
	$(PYTHON) -m vlmbackdoor_bench.cli run --jobs $(JOBS)

test: setup
	$(PYTHON) -m pytest -q
