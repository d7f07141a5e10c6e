# visionserve image, CPU or CUDA:
#   docker build -t visionserve:cpu .
#   docker build --build-arg VARIANT=cuda -t visionserve:cuda .
# The CUDA variant takes PyPI's torch wheel, which brings its CUDA libraries as pip packages, and
# onnxruntime-gpu; the host needs the NVIDIA driver and container toolkit (docker run --gpus all).
# Weights live on a volume at /models (the Hugging Face cache), never in the image.

FROM python:3.11-slim-bookworm AS build
ARG VARIANT=cpu
# The CPU variant takes torch from PyTorch's CPU-only index: the same code, ~4 GB less of CUDA.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md app.py ./
COPY scripts/install.sh scripts/
COPY apis apis
COPY clients clients
COPY configs configs
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# scripts/install.sh is the one install path (torch + torchvision pair, then sam2, then the pins).
RUN if [ "$VARIANT" = cpu ]; then export PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX"; fi \
    && bash scripts/install.sh \
    && if [ "$VARIANT" = cuda ]; then \
         .venv/bin/python -m pip uninstall -y onnxruntime \
         && .venv/bin/python -m pip install "$ONNXRUNTIME_GPU"; \
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
COPY --from=build /app /app
# Caches (Hugging Face hub, open_clip, timm, torch hub) on the /models volume; nothing writes to /app.
ENV PATH=/app/.venv/bin:$PATH \
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
# SIGTERM drains the requests in flight (--drain-timeout, 30 s), then stops.
ENTRYPOINT ["visionserve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
