# Set-up and entry points.  Override TORCH for a CUDA build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Every install is constrained by constraints.txt (exact versions, checked in), so a
# new release of a dependency never changes what the suite runs against.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c $(LOCK)
PYTEST_ARGS ?=

.PHONY: run test install bench lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed first and explicitly, so nothing that depends on it can pull
# a different (multi-GB) build.  The package is built with the locked setuptools
# (no build isolation), so a new setuptools release cannot break the build either.
install: $(PY)
	$(PIP) $(TORCH)
	$(PIP) setuptools wheel
	$(PIP) --no-build-isolation -e ".[all]"

run: install
	$(VENV)/bin/mixprec compare

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/quantize.py

# Re-resolve the lock: a throw-away venv gets the newest versions that pyproject's
# ranges admit (torch stays as TORCH says), and their exact versions replace
# constraints.txt.  Then run `make test` and commit both files together.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q $(TORCH)
	.lock-venv/bin/python -m pip install -q setuptools wheel
	.lock-venv/bin/python -m pip install -q --no-build-isolation -e ".[all]"
	.lock-venv/bin/python tools/write_lock.py .lock-venv/bin/python $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build src/*.egg-info src/mixprec/*.so
