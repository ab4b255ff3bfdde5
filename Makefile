# Two commands: `make run` (the whole pipeline on the built-in data) and `make test`.
# Both set up everything first: .venv, the CPU build of torch, the package, Tesseract.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build: pip finds it on this machine's disk; elsewhere add an index, e.g.
#   make run TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup system-deps run test bench lint clean

setup: system-deps $(VENV)/.installed

system-deps:
	@bash infra/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev,postgres,dask]' "$(TORCH)"
	touch $@

run: setup
	tinyldm run

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install -q -e '.[bench]' "$(TORCH)"
	$(PY) bench/run.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf data models reports mlflow.db mlartifacts .cache
