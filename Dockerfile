# visionserve image, CPU or CUDA:
#   docker build -t visionserve:cpu .
#   docker build --build-arg VARIANT=cuda -t visionserve:cuda .
# CPU: torch from PyTorch's CPU index only (TORCH_INDEX_URL), no CUDA libraries.
# CUDA: PyPI's torch 2.14.1 (a CUDA 13.0 build, its CUDA libraries as pip packages) and
# onnxruntime-gpu 1.31.1 (CUDA 13). The host needs an NVIDIA driver of branch 580 or newer (CUDA
# 13.0's floor), a GPU of compute capability 7.5 (Turing) or newer, and the NVIDIA container
# toolkit (docker run --gpus all).
# Every package is pinned with its sha256 in requirements/ (scripts/install.sh); they are installed
# before the code is copied, so a code change rebuilds only the small layers at the end.
# Weights live on a volume at /models (the Hugging Face cache), never in the image.

FROM python:3.11-slim-bookworm AS deps
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extra indexes (a local mirror; scripts/container_check.sh): the lock's hashes still
# decide which files are accepted.
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY scripts/install.sh scripts/
COPY requirements requirements
RUN VISIONSERVE_TORCH="$VARIANT" TORCH_INDEX_URL="$TORCH_INDEX_URL" bash scripts/install.sh deps \
    && if [ "$VARIANT" = cuda ]; then \
         .venv/bin/python -m pip uninstall -q -y onnxruntime \
         && .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/onnxruntime-gpu.txt; \
       fi

FROM python:3.11-slim-bookworm
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="visionserve" \
      org.opencontainers.image.description="CLIP, DINOv2, SAM 2, SAM 3 and RMBG behind bearer-key HTTP routes" \
      visionserve.variant="${VARIANT}"
RUN groupadd --gid 10001 visionserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin visionserve \
    && mkdir -p /models \
    && chown 10001:10001 /models
WORKDIR /app
# The dependencies: one large layer, reused as long as requirements/ and install.sh are unchanged.
COPY --from=deps /app/.venv /app/.venv
COPY app.py pyproject.toml ./
COPY configs configs
COPY clients clients
COPY apis apis
# Caches (Hugging Face hub, open_clip, timm, torch hub) on the /models volume; nothing writes to /app.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch \
    XDG_CACHE_HOME=/models/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    VISIONSERVE_CONFIG=/app/configs/default.yaml
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
# Model loading can take minutes on a cold cache: --start-period covers it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Keys: VISIONSERVE_API_KEYS (comma-separated) or --api-key-file pointing at a mounted secret.
# SIGTERM drains the requests in flight (--drain-timeout), then stops. The server runs as PID 1
# (no init needed): its model workers die with it.
ENTRYPOINT ["python", "/app/app.py", "--host", "0.0.0.0", "--port", "8000"]
CMD []
