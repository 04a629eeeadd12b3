# dpsgd — one-command set-up and checks. Run `make help` for the list.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DPSGD := $(BIN)/dpsgd

.PHONY: help install test lint quickstart bench

help:  ## list targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install:  ## create .venv and install dpsgd with its dev tools (pytest, ruff, hypothesis)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"

test:  ## run the test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint:  ## ruff
	$(BIN)/ruff check .

quickstart:  ## a one-minute DP-SGD run on Fashion-MNIST
	$(DPSGD) train --config configs/quickstart.yaml --overwrite
