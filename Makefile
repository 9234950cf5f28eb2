# make train PROJECT=hat   -> creates .venv on first use, then trains HAT on the bundled photos
# make test                -> creates .venv on first use, then runs the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROJECT ?= hat
ARGS ?=
NAME ?= $(PROJECT)

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint bench wandb-sync clean

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Exact pins: these wheels lie on the project machines' disk; a looser range downloads several GB.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[data,dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install formerlab with its data and dev extras

train: $(STAMP) ## Train on the embedded data: make train PROJECT=hat ARGS="trainer.max_steps=100"
	$(PY) train.py project=$(PROJECT) $(ARGS)

test: $(STAMP) ## Run the whole test suite, slow tests included (what CI runs)
	WANDB_MODE=disabled $(PY) -m pytest -q

test-fast: $(STAMP) ## Run the tests not marked slow
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

bench: $(STAMP) ## Run a benchmark script (on a GPU machine): make bench NAME=hat ARGS="--quick"
	$(PY) scripts/bench_$(NAME).py $(ARGS)

wandb-sync: $(STAMP) ## Upload the offline W&B runs under outputs/
	find outputs -type d -name 'offline-run-*' -exec $(VENV)/bin/wandb sync {} \;

clean: ## Remove outputs, caches and the venv
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
