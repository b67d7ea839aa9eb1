# Two-command quickstart: `make demo` and `make test`. Both create .venv/ on first use, install torch into it
# only if it cannot already import torch, then install this package in editable mode with torch pinned
# (a constraints file) so that nothing swaps the torch build. Stamp files make the second run fast.
#
# Variables (override on the command line, e.g. `make test PYTEST_ARGS="-k video -x"`):
#   PYTHON       interpreter used to create the venv (default: python3; needs 3.10+)
#   VENV         venv folder (default: .venv)
#   TORCH_SPEC   what to pip-install when the venv has no torch (default: torch==2.13.0 without a GPU,
#                plain `torch` where nvidia-smi exists)
#   TORCH_PIP_ARGS extra pip arguments for that install, e.g.
#                TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a small CPU wheel
#   PYTEST_ARGS  arguments for pytest (default: -q)
#   DEMO_ARGS    arguments for the demo CLI (default: generate --demo --out outputs/demo)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?= -q
DEMO_OUT ?= outputs/demo
DEMO_ARGS ?= generate --demo --out $(DEMO_OUT)
CONSTRAINTS := $(VENV)/torch-constraints.txt

.PHONY: help test demo setup setup-test lint figures clean

help:
	@echo "make demo     create .venv, install, generate a demo stream video into $(DEMO_OUT)/"
	@echo "make test     create .venv, install with test extras, run the whole test suite (CPU)"
	@echo "make lint     ruff + mypy (installs the dev extra)"
	@echo "make figures  regenerate docs/figures/*.png"
	@echo "make clean    remove .venv and tool caches (keeps outputs/)"

# --- environment -------------------------------------------------------------------------------------------
$(VENV)/.stamp-venv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required, found " + sys.version.split()[0] + "; run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	@touch $@

# torch: keep whatever the venv already has (a CUDA build the user installed, say); otherwise install it.
$(VENV)/.stamp-torch: $(VENV)/.stamp-venv
	@if $(PY) -c 'import torch' 2>/dev/null; then \
		echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC) into $(VENV) ($(if $(HAS_GPU),GPU found,no GPU found))"; \
		$(PIP) install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'; \
	fi
	@$(PY) -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > $(CONSTRAINTS)
	@touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	@touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

setup: $(VENV)/.stamp-install
setup-test: $(VENV)/.stamp-test

# --- targets -----------------------------------------------------------------------------------------------
# pytest's exit code is kept in $(VENV)/pytest-exit-code so .ci/run can tell "no tests collected" (5) apart
# from failures: make itself only ever exits with 2 when a recipe fails.
test: $(VENV)/.stamp-test
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; echo $$rc > $(VENV)/pytest-exit-code; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit code 5)" >&2; fi; exit $$rc

demo: $(VENV)/.stamp-install
	$(PY) -m streamdit_core $(DEMO_ARGS)
	@echo ""
	@echo "Demo finished. Videos in $(DEMO_OUT)/:"
	@ls -1 $(DEMO_OUT)/*.mp4 $(DEMO_OUT)/*.webp $(DEMO_OUT)/*.png 2>/dev/null || true

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

figures: $(VENV)/.stamp-install
	$(PY) docs/make_figures.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
