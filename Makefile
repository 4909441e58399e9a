# lfw: the two commands a newcomer types are `make finetune` and `make test`; each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LFW := $(VENV)/bin/lfw
RECIPE ?= recipes/demo.yaml
# torch and torchaudio must match (llamafactory imports torchaudio); override for another CUDA build.
TORCH_SPEC ?= torch==2.9.1 torchaudio==2.9.1 torchvision==0.24.1
PYTEST_ARGS ?=

.PHONY: setup finetune chat eval test test-fast lint bench bench-scale clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q $(TORCH_SPEC) -e '.[dev]'
	@touch $@

finetune: setup
	$(LFW) train $(RECIPE)

chat: setup
	$(LFW) chat

eval: setup
	$(LFW) eval

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check wrapper tests

bench: setup
	$(PY) -m wrapper.bench

bench-scale: setup
	$(PY) -m wrapper.bench_scale --out BENCH.md

clean:
	rm -rf rendered build dist *.egg-info
