# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve test test-unit test-integration bench clean

install: $(STAMP)

# Re-runs only when a requirements file changes, so `make install` is a no-op when up to date.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

serve: install
	$(PY) entrypoint.py --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
