# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.faig-installed

.PHONY: demo test bench install ext kernels-check gpu-check

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU machines: the pinned CPU wheel first, so nothing pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m faig_fast demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m faig_fast bench

# Build the optional C++/CUDA extension now (backend "auto" uses it once built; it never compiles on a call).
ext: $(STAMP)
	$(PY) -m faig_fast info --build

# Compile every Triton kernel and autotune config for sm_80/sm_90 (no GPU needed); with nvcc, also csrc/*.cu.
kernels-check: $(STAMP)
	$(PY) -m faig_fast info --kernels sm_80,sm_90 $$(command -v nvcc >/dev/null && echo --nvcc)

# On a CUDA machine whose python3 already has torch, triton and the test tools: no venv, no download.
# CUDA tests, engine vs naive loop (crops and full Set14, 3 precisions, 2 rules), roofline, training
# throughput -> benchmarks/results/gpu-<device>-<date>.{json,md}, in at most 8 minutes.  Without CUDA:
# a tiny CPU dry run that checks the wiring and exits 0.  When $(GPU_PY) cannot import torch, the run
# uses the project's $(VENV) instead, created and installed as by `make install`.  (The torch probe
# runs when the recipe is expanded, so `make -n gpu-check` shows the branch that would run.)
GPU_PY ?= python3
gpu-check:
	$(eval GPU_HAS_TORCH := $(shell $(GPU_PY) -c "import torch" >/dev/null 2>&1 && echo yes))
	$(if $(GPU_HAS_TORCH),,$(info gpu-check: $(GPU_PY) cannot import torch; using $(VENV), installed as by make install))
	$(if $(GPU_HAS_TORCH),$(GPU_PY) -m pip install -q -e . --no-deps --no-build-isolation,$(MAKE) --no-print-directory install)
	$(if $(GPU_HAS_TORCH),$(GPU_PY),$(PY)) -m faig_fast.apps.gpu_check
