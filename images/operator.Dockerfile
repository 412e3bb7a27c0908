# syntax=docker/dockerfile:1
# The Tailor operator: kopf controllers, builders and the Kubernetes runtime. Core
# dependencies only (`pip install .`): no torch, no model libraries.
#
#   make images                      # here: BASE is a Debian root filesystem (images/build.sh)
#   docker build -f images/operator.Dockerfile -t tailor-operator:0.1.0 .   # elsewhere
#
# BASE is any image with python3 (3.11 or later) and its venv module: Docker Hub's
# python:*-slim, or the Debian base images/build.sh makes with mmdebstrap (no Docker Hub).
# Runs as UID 1000 with a read-only root filesystem (see charts/tailor).
ARG BASE=python:3.11.13-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
RUN python3 -m venv /opt/tailor
COPY pyproject.toml README.md ./
COPY operator/tailor ./operator/tailor
# kubernetes/aio is the client's asyncio copy (64 MB with its bytecode), which Tailor never
# imports (kopf speaks to the API server with aiohttp itself).
RUN /opt/tailor/bin/pip install --no-cache-dir --no-compile . \
 && /opt/tailor/bin/pip uninstall --yes pip \
 && rm -rf /opt/tailor/lib/python3*/site-packages/kubernetes/aio \
 && /opt/tailor/bin/python -m compileall -q /opt/tailor/lib

FROM ${BASE}
RUN groupadd --gid 1000 tailor \
 && useradd --uid 1000 --gid 1000 --home-dir /home/tailor --create-home --shell /usr/sbin/nologin tailor
COPY --from=build /opt/tailor /opt/tailor
ENV PATH=/opt/tailor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /home/tailor
# 8080: liveness (/healthz), 8081: Prometheus (/metrics).
EXPOSE 8080 8081
ENTRYPOINT ["tailor"]
CMD ["operator", "run"]
