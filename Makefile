# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve lint test test-quick test-unit test-integration fuzz bench gpu-check clean

install: $(STAMP)

# Re-runs only when a requirements file changes, so `make install` is a no-op when up to date.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

serve: install
	$(PY) entrypoint.py --host $(HOST) --port $(PORT) $(ARGS)

# Lint first (seconds), then the suite. -O: no check of the server may rely on `assert`
# (removed under -O); pytest keeps its own.
test: install lint
	$(PY) -O -m pytest tests -m "not gpu" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/yamllint --strict .
	$(VENV)/bin/hadolint Dockerfile

# The inner loop (under 2 minutes): unit tests not marked slow, and the core end-to-end files.
test-quick: install
	$(PY) -O -m pytest -m "not slow" tests/unit tests/integration/test_chat.py tests/integration/test_errors.py $(PYTEST_ARGS)

# A longer schemathesis run against a real server (make test runs 15 examples per operation).
fuzz: install
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} $(PY) -m pytest tests/integration/test_fuzz.py -s $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.compare $(ARGS)

# On a GPU machine (under 8 minutes on one card): GPU-marked tests, bench/gpu.py, one JSON summary
# in bench/results/. Without a GPU it says so and exits 0.
gpu-check: install
	$(PY) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
