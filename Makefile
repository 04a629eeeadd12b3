# dpsgd — one-command set-up and checks. Run `make help` for the list.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DPSGD := $(BIN)/dpsgd
# pytest processes (pytest-xdist); tracing TensorFlow graphs is single-threaded, so two processes use two
# cores much better than one. More need about 1.5 GB of memory each: `make test TEST_WORKERS=4`
TEST_WORKERS ?= 2

.PHONY: help install test test-fast lint typecheck docs docs-check quickstart bench bench-accounting

help:  ## list targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install:  ## create .venv and install dpsgd with its dev tools (pytest, ruff, hypothesis, mypy, mkdocs) and the trackers (TensorBoard, MLflow)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"

test:  ## run the test suite (what CI runs): ruff, mypy, a strict docs build, pytest
	$(BIN)/ruff check .
	$(BIN)/mypy
	@$(MAKE) --no-print-directory docs-check
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast:  ## ruff, mypy + every test that trains no model (pytest -m "not slow"): about two minutes
	$(BIN)/ruff check .
	$(BIN)/mypy
	@$(MAKE) --no-print-directory docs-check
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

lint:  ## ruff
	$(BIN)/ruff check .

typecheck:  ## mypy on the privacy code, the config and the public API (the files listed in pyproject.toml)
	$(BIN)/mypy

# mkdocs' --quiet hides warnings from --strict as well, so the check keeps the log and prints it on failure.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs:  ## build the documentation site into site/ (mkdocs build --strict: a broken link or anchor fails)
	$(MKDOCS) build --strict

docs-check:  ## the strict docs build into a temporary folder, quiet unless it fails (part of make test)
	@d=$$(mktemp -d) && $(MKDOCS) build --strict -d "$$d/site" > "$$d/log" 2>&1; s=$$?; \
	if [ $$s -ne 0 ]; then cat "$$d/log"; fi; rm -rf "$$d"; \
	if [ $$s -ne 0 ]; then echo "docs-check: mkdocs build --strict failed"; fi; exit $$s

bench:  ## step-time benchmark: non-private vs DP paths, batch 64/256/1024, XLA on/off (a few minutes)
	$(DPSGD) bench

quickstart:  ## a one-minute DP-SGD run on Fashion-MNIST
	$(DPSGD) train --config configs/quickstart.yaml --overwrite

# --- Sweeps and the σ = 1.1 / 1.2 baseline. Every run is its own make target (one directory each), so
# `make -j2 reproduce` trains two runs side by side; finished runs are skipped when a target is re-made.
# A sweep's summary.csv is rebuilt (under a lock) by each run, so it ends up listing them all.
RESULTS ?= results
SWEEP_EPOCHS ?= 20
SWEEP_EPSILON ?= 1.0
SWEEP_BATCH_SIZES ?= 64 128 256 512 1024
SWEEP_SIGMAS ?= 0.8 1.0 1.1 1.2 1.5
SWEEP_ARGS ?=
REPRODUCE_EPOCHS ?=
SWEEP_BASE := configs/fashion_mnist_sigma1.1.yaml
SWEEP := $(DPSGD) sweep --quiet --set output_dir=$(RESULTS) $(SWEEP_ARGS)
BATCH_RUNS := $(SWEEP_BATCH_SIZES:%=sweep-batch-%)
SIGMA_RUNS := $(SWEEP_SIGMAS:%=sweep-sigma-%)
REPRODUCE_RUNS := reproduce-sigma1.1 reproduce-sigma1.2

.PHONY: sweep-batch sweep-sigma reproduce $(BATCH_RUNS) $(SIGMA_RUNS) $(REPRODUCE_RUNS)

sweep-batch: $(BATCH_RUNS)  ## batch sizes 64..1024 at one ε (SWEEP_EPSILON, σ calibrated per run), SWEEP_EPOCHS epochs
	$(DPSGD) plot $(RESULTS)/sweep-batch
	$(DPSGD) report $(RESULTS)/sweep-batch

$(BATCH_RUNS): sweep-batch-%:
	$(SWEEP) --config $(SWEEP_BASE) --name sweep-batch --epochs $(SWEEP_EPOCHS) \
		--set privacy.noise_multiplier=null --set privacy.target_epsilon=$(SWEEP_EPSILON) --grid data.batch_size=$*

sweep-sigma: $(SIGMA_RUNS)  ## σ = 0.8..1.5 at batch 256, SWEEP_EPOCHS epochs
	$(DPSGD) plot $(RESULTS)/sweep-sigma
	$(DPSGD) report $(RESULTS)/sweep-sigma

$(SIGMA_RUNS): sweep-sigma-%:
	$(SWEEP) --config $(SWEEP_BASE) --name sweep-sigma --epochs $(SWEEP_EPOCHS) --grid privacy.noise_multiplier=$*

reproduce: $(REPRODUCE_RUNS)  ## the tutorial CNN on Fashion-MNIST at σ = 1.1 and 1.2, 100 epochs each (REPRODUCE_EPOCHS=20 for less)
	$(DPSGD) plot $(RESULTS)/reproduce
	$(DPSGD) report $(RESULTS)/reproduce

$(REPRODUCE_RUNS): reproduce-%:
	$(SWEEP) --config configs/fashion_mnist_$*.yaml --name reproduce $(if $(REPRODUCE_EPOCHS),--epochs $(REPRODUCE_EPOCHS))

bench-accounting:  ## time dpsgd epsilon / dpsgd noise against their wall-time targets, and the per-epoch PLD curve
	$(BIN)/python benchmarks/bench_accounting.py
