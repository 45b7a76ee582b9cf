# Set-up and entry points.  Override TORCH for a CUDA build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and explicitly, so nothing that depends on it can pull
# a different (multi-GB) build.
install: $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all]"

run: install
	$(VENV)/bin/mixprec compare

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/quantize.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/mixprec/*.so
