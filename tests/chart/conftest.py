"""Fixtures for tests/chart: the session control plane with minimal stand-ins of the
Prometheus Operator's CRDs (``fixtures/monitoring-crds.yaml``), so that ServiceMonitors,
PodMonitors and PrometheusRules can be sent to its API server, and a namespace per test.

Rendering tests need only helm. The cluster tests install the chart on the session cluster,
whose Tailor CRDs exist already (applied from ``crds/``): Helm leaves existing CRDs alone,
which is what an upgrade meets; the install test checks the chart's CRDs either way.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tailor.devcluster.kube import Kube, create_namespace, delete_namespace, wait_established
from tests.chart.helpers import FIXTURES


@pytest.fixture(scope="session")
def chart_cluster(kube: Kube) -> Kube:
    """The session control plane, with the monitoring CRD stand-ins."""
    out = kube.kubectl(
        "apply", "--server-side", "-o", "name", "-f", str(FIXTURES / "monitoring-crds.yaml")
    ).stdout
    wait_established(kube.kubeconfig, [line.split("/", 1)[1] for line in out.split()])
    return kube


@pytest.fixture
def chart_namespace(chart_cluster: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace of the chart cluster for one test."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"c-{slug}-{secrets.token_hex(3)}"
    create_namespace(chart_cluster, name)
    yield name
    delete_namespace(chart_cluster, name)
