# resunet: the web UI (default) and the command line in one image.
#
#   docker build -t resunet .                                   # CPU image (torch CPU build)
#   docker build -t resunet:cuda --build-arg VARIANT=cuda .     # CUDA image (PyPI's CUDA torch build)
#   docker run --rm -p 127.0.0.1:8501:8501 resunet              # web UI on http://localhost:8501
#   docker run --rm -v "$PWD:/work" --user "$(id -u):$(id -g)" -e HOME=/tmp \
#       resunet resunet predict /work/study.nii.gz --out /work/masks
#   docker run --rm --gpus all -p 127.0.0.1:8501:8501 resunet:cuda
#
# No ENTRYPOINT: the default command serves the web UI; any other command (resunet predict, resunet
# evaluate, bash) replaces it. Both stages use the same Python base; the CUDA runtime libraries come
# with the torch wheels (the host needs the NVIDIA driver and container toolkit only).

ARG PYTHON_VERSION=3.11

# -- build: a virtual environment with resunet and its dependencies ---------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU index for the CPU image (a plain PyPI install would pull ~3 GB of CUDA)
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX"; \
    elif [ "$VARIANT" = "cuda" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    else \
        echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2; \
    fi

# the project, installed as a regular (non-editable) package: the web UI, the bundled models and the
# example study are package data inside it (resunet/webui, resunet/data), so the venv is the product
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY resunet ./resunet
RUN pip install --no-cache-dir -c constraints.txt ".[postgres]" \
    && python -c "import torch, resunet; print('torch', torch.__version__, 'resunet', resunet.__version__)"

# -- runtime: the environment (code, web UI, bundled models and example study inside the package) ---
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="resunet" \
      org.opencontainers.image.description="Residual U-Net segmentation of DICOM and NIfTI scans: CLI and web UI" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --gid 10001 resunet \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin resunet

COPY --from=build /opt/venv /opt/venv
# the working directory: `resunet app` runs Streamlit here, so a login goes in
# /opt/resunet/.streamlit/secrets.toml (mounted at run time, docs/webui.md)
WORKDIR /opt/resunet

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RESUNET_APP_TEMP_DIR=/tmp/resunet-app \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

USER 10001:10001
EXPOSE 8501

# Streamlit's health endpoint answers "ok"; python's urllib because the slim image has no curl
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).read() == b'ok' else 1)"]

# inside the container the server must listen on all interfaces for -p to reach it; publish it on
# 127.0.0.1 (as above) or configure a login (docs/webui.md) before exposing it on a network.
# --allow-anonymous states that choice (resunet app refuses 0.0.0.0 without a login otherwise) and
# prints a warning at every start.
CMD ["resunet", "app", "--address", "0.0.0.0", "--port", "8501", "--headless", "--allow-anonymous"]
