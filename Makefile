# Set-up and the common runs. Needs only Python >= 3.10 with venv and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: sample test drills test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

## The main job on the built-in sample: synthetic raw set → ESM2nv layout → verify.
sample: $(STAMP)
	$(BIN)/esm2dask synth sample/uniref50_90_sample --clusters 20000 --seed 0 --overwrite
	$(BIN)/esm2dask preprocess sample/uniref50_90_sample --overwrite
	$(BIN)/esm2dask verify sample/uniref50_90_sample_preproc
	@echo "Output: sample/uniref50_90_sample_preproc"

## The default test run (offline, a few minutes).
test: $(STAMP)
	$(BIN)/python -m pytest

## The long fault drills that `make test` skips (CI runs them after `make test`).
drills: $(STAMP)
	$(BIN)/python -m pytest -m drill; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

## Everything, the slow tests and the drills too.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

## Every benchmark study (writes benchmarks/results/; takes ~20 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.partition_sweep
	$(BIN)/python -m benchmarks.engines
	$(BIN)/python -m benchmarks.input_order
	$(BIN)/python -m benchmarks.driver_memory
	$(BIN)/python -m benchmarks.profile_run
	$(BIN)/python -m benchmarks.storage_and_cluster
	$(BIN)/python -m benchmarks.formats
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) sample .pytest_cache
