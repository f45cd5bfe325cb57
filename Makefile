# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install serve lint test test-quick test-unit test-integration fuzz bench gpu-check gpu-wheels clean

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
	$(PY) -O -m pytest -m "not slow" tests/unit tests/integration/test_chat.py tests/integration/test_errors.py tests/integration/test_request_bodies.py $(PYTEST_ARGS)

# A longer schemathesis run against a real server (make test runs 15 examples per operation).
fuzz: install
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-300} $(PY) -m pytest tests/integration/test_fuzz.py -s $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.compare $(ARGS)

# On a GPU machine (sized for 8 minutes on one card, not yet timed there): GPU-marked tests,
# bench/gpu.py, bench/gpu_serve.py, one JSON summary
# in bench/results/. Without a GPU it says so and exits 0. It uses .venv when there is one, else
# the machine's python3 (a GPU image that has CUDA torch but no route to a package index), with
# the server's other dependencies from the wheels `make gpu-wheels` put in .whl/.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@if [ ! -x $(PY) ] && [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; fi
	PYTHONPATH=/tmp/site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check $(ARGS)

# Wheels (CPython 3.12, x86-64 Linux) of what a torch GPU image lacks, for `make gpu-check` there:
# the server's dependencies, then those of `transformers serve` (bench/gpu_serve.py's peer).
GPU_WHEELS := transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 litestar==2.25.0 \
	litestar-htmx==0.5.0 msgspec==0.22.0 granian==2.8.7 llguidance==1.9.1 polyfactory==3.5.0 faker==40.63.0 \
	multipart==2.0.1 rich-click==1.9.9 anyio==4.16.0 \
	fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 openai==3.51.0 jiter==0.19.0 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 \
	httpx2==2.16.2 httpcore2==2.16.2 opentelemetry-api==1.45.2 truststore==0.10.5 sniffio==1.3.1
GPU_PLATFORMS := $(foreach n,17 24 27 28 31 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) --platform any -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
