# syntax=docker/dockerfile:1
# The Tailor operator: kopf controllers, builders and the Kubernetes runtime. Core
# dependencies only (`pip install .`): no torch, no model libraries.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/tailor-dev/tailor-operator:0.1.0 .
#
# Runs as UID 1000 with a read-only root filesystem (see charts/tailor).

FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/tailor
COPY pyproject.toml README.md ./
COPY operator/tailor ./operator/tailor
RUN /opt/tailor/bin/pip install --no-cache-dir --no-compile . \
 && /opt/tailor/bin/python -m compileall -q /opt/tailor/lib

FROM python:3.11.13-slim-bookworm
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
