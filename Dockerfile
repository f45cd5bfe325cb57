# syntax=docker/dockerfile:1
#
# GPU image for the OpenAI-compatible inference server.
#   docker build -t llm-fastapi:latest .
#   docker build --build-arg INSTALL_FLASH_ATTN=0 -t llm-fastapi:sdpa .      # skip flash-attn
#   docker build --build-arg FLASH_ATTN_SPEC=https://.../flash_attn-...whl .  # a wheel matching torch/CUDA/py
# See deploy/README.md for run, compose and Kubernetes examples.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# torch is pinned in requirements.txt; the CUDA build of the same version comes from PyTorch's index
# (its wheels bundle their CUDA libraries, so the index must match the base image's CUDA major).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG INSTALL_FLASH_ATTN=1
ARG FLASH_ATTN_SPEC=flash-attn

# A fixed HOME keeps the default cache (~/.cache/usinc/models) in one place for any --user.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/root

# Ubuntu 22.04 ships Python 3.10; deadsnakes provides a maintained 3.11 (the version CI tests with).
# gcc + python3.11-dev: Triton (torch.compile, fused kernels) compiles a small launcher at runtime.
# git: --transformers-path accepts git+https URLs.
# Build tools are left unpinned: runtime dependencies are pinned in requirements.txt.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc git \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel packaging

# torchvision (same index, the release paired with torch 2.13) is needed by processors with a video
# part (Qwen2/2.5/3-VL, InternVL, LLaVA-OneVision) and by Pixtral/Mistral3. Without it the server
# still loads those models for images only; Pixtral does not load at all.
ARG TORCHVISION_VERSION=0.28.0
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY requirements.txt .
# torch==2.13.0 is already satisfied by the CUDA build (local version labels match), so it stays.
RUN pip install -r requirements.txt

# flash-attn is optional: without a prebuilt wheel for this torch/CUDA/Python it would need nvcc,
# which the runtime image lacks. A half-installed package would make transformers believe FA2 is
# available, so anything that does not import cleanly is removed and the server uses SDPA.
# hadolint ignore=DL3013,SC2015
RUN if [ "${INSTALL_FLASH_ATTN}" = "1" ]; then \
      pip install ninja psutil einops \
      && FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation "${FLASH_ATTN_SPEC}" \
      && python -c "import flash_attn, flash_attn_2_cuda; print('Flash Attention:', flash_attn.__version__)" \
      || { echo "flash-attn unavailable: SDPA fallback"; pip uninstall -y flash-attn flash_attn || true; }; \
    else \
      echo "flash-attn skipped (INSTALL_FLASH_ATTN=${INSTALL_FLASH_ATTN}): SDPA fallback"; \
    fi

COPY entrypoint.py ./
COPY app/ app/
COPY scheduler/ scheduler/
COPY models/ models/

# World-writable cache so the image also runs with an arbitrary --user (OpenShift, rootless).
RUN mkdir -p /root/.cache/usinc/models \
 && chmod 0755 /root \
 && chmod -R a+rwX /root/.cache
VOLUME ["/root/.cache/usinc/models"]

EXPOSE 8000

# Model loading can take minutes; the start period keeps Docker from calling that unhealthy.
# Uses PORT from the environment; a --port flag alone is not seen here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % (os.environ.get('PORT') or '8000'), timeout=4)"]

ENTRYPOINT ["python", "entrypoint.py"]
