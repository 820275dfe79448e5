# Developer entry points. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after a successful install, so `make test` reinstalls only when requirements change.
VENV_STAMP := $(VENV)/.requirements-installed
DEMO_WEIGHTS := weights/demo
DEMO_STAMP := $(DEMO_WEIGHTS)/DEMO_RANDOM_WEIGHTS.txt

.PHONY: venv test soak demo schema bench gpu-check

venv: $(VENV_STAMP)

# torch==2.13.0 is pinned in requirements.txt; pip takes its CPU wheel from the local wheel
# directory configured for pip on these machines (the Cog image installs the CUDA build).
$(VENV_STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# The whole suite at the CPU's own kernel level, then the tests whose results can depend on the
# level (marked kernel_level) once more under each lower level this CPU runs: default and avx2 on
# an AVX512 machine, default on an AVX2 one (tests/kernel_levels.py, which also caps oneDNN and MKL
# at that level's instructions).
test: venv
	$(PY) -m pytest -q tests
	@$(PY) tests/kernel_levels.py --others | while read -r settings; do \
		echo "== tests marked kernel_level, under $$settings"; \
		env $$settings $(PY) -m pytest -q -m kernel_level tests || exit 1; \
	done

# Many more schedule seeds than CI (SEEDS=500: seeds 0-499; SEEDS=a-b or SEEDS=a,b,c to replay), then
# the HTTP soak of the real server (scripts/soak.py) with SOAK_PREDICTIONS predictions (default 1000).
SEEDS ?= 500
SOAK_PREDICTIONS ?= 1000
soak: venv
	SEEDS=$(SEEDS) $(PY) -m pytest -q -s tests/engine/test_schedules.py
	$(PY) scripts/soak.py --predictions $(SOAK_PREDICTIONS)

# Random weights in the real layout: the demo's answers are noise.
$(DEMO_STAMP): scripts/make_demo_checkpoint.py | venv
	$(PY) scripts/make_demo_checkpoint.py --out $(DEMO_WEIGHTS)

demo: venv $(DEMO_STAMP)
	DEEPSEEK_VL2_WEIGHTS=$(DEMO_WEIGHTS) $(PY) scripts/demo.py

schema: venv
	$(PY) scripts/make_openapi_schema.py

bench: venv
	$(PY) scripts/benchmark.py

# Parity tests on CUDA and the benchmark of tiny/small/base on one NVIDIA GPU (exits 2 without one);
# writes gpu_check.json (and a copy into $OUT when set). Options: GPU_CHECK_ARGS="--only ... --variants ...".
# On a GPU host whose own python has CUDA torch, use it instead of the venv: make gpu-check PY=python3
# (the venv is then neither built nor needed).
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),venv)
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)
