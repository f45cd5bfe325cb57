# syntax=docker/dockerfile:1
#
# GPU image for the OpenAI-compatible inference server (runs as uid 10001, never root).
#   docker build -t "$REGISTRY/docoserve:$IMAGE_TAG" .
#   docker build --build-arg FLASH_ATTN_WHEEL='https://host/flash_attn-...whl#sha256=...' ...
# See deploy/README.md for run, compose and Kubernetes, docs/FLASH_ATTENTION_BUILD.md for the
# attention kernels and what the package index holds for the pins below.
#
# No CUDA base image: torch 2.13.0's Linux wheel on PyPI is the CUDA 13.0 build and pulls the
# CUDA libraries it needs as pip packages (cuda-toolkit 13.0.3, nvidia-cudnn-cu13 ...). The node
# only has to supply an NVIDIA driver new enough for CUDA 13.0 (R580 or later).
# Debian 12 is the distribution the apt pins below were resolved against.
FROM python:3.11-slim-bookworm

# The kernel compile caches (Triton, CUDA JIT, anything following XDG) go to /tmp, the one
# scratch path a read-only root filesystem keeps writable; the model cache is CACHE_DIR.
# HOME=/root (the app user's home, traversable, not writable apart from ~/.cache): the default
# CACHE_DIR is ~/.cache/usinc/models, i.e. /root/.cache/usinc/models as the spec documents. HOME,
# not CACHE_DIR, so HF_HUB_CACHE and HF_HOME set at run time still move it (app/settings.py
# resolves CACHE_DIR > HF_HUB_CACHE > HF_HOME/hub > ~/.cache/usinc/models).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/root \
    TRITON_CACHE_DIR=/tmp/triton \
    CUDA_CACHE_PATH=/tmp/nv-compute-cache \
    XDG_CACHE_HOME=/tmp/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc + libc6-dev: Triton (fused kernels, torch.compile) compiles a small launcher at first use,
# and a CPU replica its kernels (models/csrc: attention, linears, norms, rotary; cached under XDG_CACHE_HOME).
# git: --transformers-path accepts git+https URLs (pip installs them into /opt/venv at start).
# Versions are Debian 12's (`apt-cache policy gcc libc6-dev git ca-certificates`); a Debian
# security update retires the old version, so a failing build here means: update the pin.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates=20250419~deb12u2 \
      gcc=4:12.2.0-3 \
      libc6-dev=2.36-9+deb12u14 \
      git=1:2.39.5-0+deb12u3 \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid that Kubernetes' runAsUser/fsGroup and `docker run --user` can name; no login
# shell. The one step that needs root: everything after it is installed as uid 10001.
# - /opt/venv belongs to uid 10001, so --transformers-path / TRANSFORMERS_INSTALL_PATH (pip install -U
#   at start) works in a plain `docker run`; with a read-only root filesystem it still cannot.
# - /root/.cache/usinc/models (the default cache, the VOLUME below) belongs to uid 10001, so a named
#   volume mounted there starts out writable by it; /root itself stays root's, mode 0711 (traversable,
#   not listable or writable).
# - /app (the code) stays root's: the server cannot rewrite its own code.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /root --no-create-home --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0755 /opt/venv /root/.cache /root/.cache/usinc /root/.cache/usinc/models \
 && install -d -m 0755 /app \
 && chmod 0711 /root

USER 10001:10001
RUN python -m venv /opt/venv \
 && pip install pip==26.3 setuptools==84.2.1 wheel==0.46.3 packaging==26.4

# The largest layer first and on its own, so a change to requirements.txt does not download the
# ~3 GB of torch + CUDA libraries again. TORCH_VERSION must equal requirements.txt's pin (a test
# checks); torchvision 0.28.0 is the release that requires exactly torch==2.13.0. Both come from
# PyPI, whose Linux x86_64 wheels are the CUDA 13.0 builds.
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY requirements.txt .
# torch is already satisfied by the layer above, so this layer only holds the pure-Python stack.
RUN pip install -r requirements.txt

# FlashAttention 2: no wheel on the package index matches torch 2.13 + CUDA 13 + cp311 (PyPI has
# flash-attn sdists only, and flash-attn's own release matrix stops at torch 2.10), so by default
# none is installed and the server says at startup `attention=sdpa (flash_attention_2 requested;
# flash_attn not installed)`. A wheel you built or trust goes in FLASH_ATTN_WHEEL as a URL with
# a `#sha256=` fragment (pip checks it). One that does not import is removed again, so
# transformers never sees a half-installed FA2; the build log says which way it went.
# DL3013 (pin pip versions) cannot see that a wheel URL with a sha256 fragment pins one exact file.
ARG FLASH_ATTN_WHEEL=""
# hadolint ignore=DL3013
RUN if [ -z "${FLASH_ATTN_WHEEL}" ]; then \
      echo "flash-attn: no wheel given (FLASH_ATTN_WHEEL), the server uses SDPA"; \
    elif pip install --no-deps "${FLASH_ATTN_WHEEL}" \
         && python -c "import flash_attn, flash_attn_2_cuda; print('flash-attn', flash_attn.__version__)"; then \
      echo "flash-attn: installed"; \
    else \
      echo "flash-attn: wheel does not match torch ${TORCH_VERSION}/CUDA 13/cp311, removed: SDPA fallback"; \
      pip uninstall -y flash-attn; \
    fi

# Code last: it changes most often. COPY writes it as root (0:0, whatever USER is), so it is not
# writable by the server's user.
COPY entrypoint.py ./
COPY app/ app/
COPY scheduler/ scheduler/
COPY models/ models/

# The default cache (created above, owned by uid 10001): mount a volume here to keep downloads.
VOLUME ["/root/.cache/usinc/models"]
EXPOSE 8000

# Model loading can take minutes; the start period keeps Docker from calling that unhealthy.
# /health is readiness (200 once the model serves), at the address entrypoint.py writes to a file
# (the flags' port and host), else at PORT; never through HTTP_PROXY, which a cluster may set
# without NO_PROXY for 127.0.0.1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, pathlib, urllib.request; noted = pathlib.Path(os.environ.get('TMPDIR') or '/tmp', 'docoserve-health-url'); url = noted.read_text().strip() if noted.exists() else 'http://127.0.0.1:%s/health' % (os.environ.get('PORT') or '8000'); urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=4)"]

# Flags go to the server (`IMAGE --model-path ...`); anything else runs as a command instead
# (`IMAGE python3 -c "import flash_attn"`), the docker-entrypoint convention.
ENTRYPOINT ["python", "entrypoint.py"]
