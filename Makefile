# Developer entry points. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after a successful install, so `make test` reinstalls only when requirements change.
VENV_STAMP := $(VENV)/.requirements-installed
DEMO_WEIGHTS := weights/demo
DEMO_STAMP := $(DEMO_WEIGHTS)/DEMO_RANDOM_WEIGHTS.txt

.PHONY: venv test demo schema bench

venv: $(VENV_STAMP)

# torch==2.13.0 is pinned in requirements.txt; pip takes its CPU wheel from the local wheel
# directory configured for pip on these machines (the Cog image installs the CUDA build).
$(VENV_STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

# Random weights in the real layout: the demo's answers are noise.
$(DEMO_STAMP): scripts/make_demo_checkpoint.py | venv
	$(PY) scripts/make_demo_checkpoint.py --out $(DEMO_WEIGHTS)

demo: venv $(DEMO_STAMP)
	DEEPSEEK_VL2_WEIGHTS=$(DEMO_WEIGHTS) $(PY) scripts/demo.py

schema: venv
	$(PY) scripts/make_openapi_schema.py

bench: venv
	$(PY) scripts/benchmark.py
