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
DOWNLOAD_ARGS ?=
EXPERTS ?=
RUN_ARGS := $(if $(OUT),--out $(OUT)) $(if $(EXPERTS),--experts $(EXPERTS)) --runner $(RUNNER)
LABELS_DIR = $(if $(OUT),$(OUT),$(LABELS_ROOT)/$(DATASET))

.PHONY: labels test lint check weights inspect download prepare train

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when setup.cfg changes.
$(VENV)/.base: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.full: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[experts,ray,train,download,dev]'
	touch $@ $(VENV)/.base

labels: $(VENV)/.base $(if $(filter ray,$(RUNNER)),$(VENV)/.full)
	$(BIN)/label-pipeline run $(DATASET) $(RUN_ARGS)
	@if [ "$(DATASET)" = demo ]; then \
	  $(BIN)/label-pipeline inspect $(LABELS_DIR)/shards/00000.tar --out $(LABELS_DIR)/sheet.png --limit 6; fi

test: $(VENV)/.full
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --timeout 900 tests

lint: $(VENV)/.full
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# What CI checks before the tests: lint, formatting, and types (mypy's settings are in pyproject.toml).
check: $(VENV)/.full lint
	$(BIN)/mypy

weights: $(VENV)/.full
	$(BIN)/label-pipeline weights --experts $(EXPERTS)

inspect: $(VENV)/.base
	$(BIN)/label-pipeline inspect $(LABELS_DIR)/shards/00000.tar --out $(LABELS_DIR)/sheet.png

# Input shards from the published URL lists (CC3M, SBU, CC12M) with img2dataset; see docs/DATASETS.md.
download: $(VENV)/.full
	$(BIN)/label-pipeline download $(DATASET) --data-root $(DATA_ROOT) $(DOWNLOAD_ARGS)

# COCO / VG: check the archives the user downloaded; see docs/DATASETS.md.
prepare: $(VENV)/.base
	$(BIN)/label-pipeline prepare $(DATASET) --data-root $(DATA_ROOT)

# The bundled Prismer trainer over label shards (CONFIG: tiny for the demo, prismer_base, prismer_large).
CONFIG ?= $(if $(filter demo,$(DATASET)),tiny,prismer_base)
train: $(VENV)/.full
	@if [ "$(DATASET)" = demo ] && [ ! -f $(LABELS_ROOT)/demo/records/00000.done.json ]; then $(MAKE) labels; fi
	$(BIN)/label-pipeline train --dataset $(DATASET) --config $(CONFIG)
