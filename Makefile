# The two commands a user needs: `make labels` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= demo
RUNNER ?= local
export DATA_ROOT ?= data
export LABELS_ROOT ?= labels
OUT ?=
EXPERTS ?=
RUN_ARGS := $(if $(OUT),--out $(OUT)) $(if $(EXPERTS),--experts $(EXPERTS)) --runner $(RUNNER)
LABELS_DIR = $(if $(OUT),$(OUT),$(LABELS_ROOT)/$(DATASET))

.PHONY: labels test lint weights inspect clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when setup.cfg changes.
$(VENV)/.base: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.full: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[experts,ray,train,dev]'
	touch $@ $(VENV)/.base

labels: $(VENV)/.base $(if $(filter ray,$(RUNNER)),$(VENV)/.full)
	$(BIN)/label-pipeline run $(DATASET) $(RUN_ARGS)
	@if [ "$(DATASET)" = demo ]; then \
	  $(BIN)/label-pipeline inspect $(LABELS_DIR)/shards/00000.tar --out $(LABELS_DIR)/sheet.png --limit 6; fi

test: $(VENV)/.full
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

lint: $(VENV)/.full
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

weights: $(VENV)/.full
	$(BIN)/label-pipeline weights --experts $(EXPERTS)

inspect: $(VENV)/.base
	$(BIN)/label-pipeline inspect $(LABELS_DIR)/shards/00000.tar --out $(LABELS_DIR)/sheet.png
