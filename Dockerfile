# deploykit on an NVIDIA GPU server: vLLM (CUDA) + the gateway.
#   docker build -t deploykit .
#   docker run --gpus all -p 8000:8000 -v ~/.deploykit:/root/.deploykit -v deploykit-cache:/root/.cache \
#       deploykit serve MODEL --host 0.0.0.0
# /root/.cache holds the HF cache (pulled weights) and vLLM's compile cache: on a volume, a new container
# neither downloads nor compiles again.
# For a CPU-only host: docker build --build-arg ENGINE=cpu -t deploykit:cpu .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG ENGINE=gpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DEPLOYKIT_HOME=/root/.deploykit

RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/deploykit
COPY pyproject.toml README.md Makefile ./
COPY deploykit ./deploykit
COPY models ./models
COPY serve ./serve
COPY loadtests ./loadtests
# The same install step as `make install`, without the test tools.
RUN pip install ".[${ENGINE}]" \
      || pip install ".[${ENGINE}]" --extra-index-url https://download.pytorch.org/whl/cpu \
    && if [ "${ENGINE}" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s CMD python -c \
    "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
ENTRYPOINT ["deploykit"]
CMD ["serve", "--host", "0.0.0.0"]
