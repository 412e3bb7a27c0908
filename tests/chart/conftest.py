"""Fixtures for tests/chart: the chart, helm, and a control plane of the chart's own.

Rendering tests need only helm. The cluster tests install the chart, and a real
``helm install`` must find a cluster without Tailor's CRDs (Helm creates them from
``crds/``), so they get a dev control plane of their own instead of the session one
(which has the CRDs from ``crds/`` applied by tests/cluster): state directory
``<state root>/pytest-chart-<pid>`` (or ``$TAILOR_TEST_CLUSTER_DIR-chart-<pid>``), new for
the session and deleted at its end; with ``TAILOR_KEEP_CLUSTER=1`` it is ``pytest-chart``,
kept and reused. It also carries minimal stand-ins of the
Prometheus Operator's CRDs (``fixtures/monitoring-crds.yaml``) so that ServiceMonitors,
PodMonitors and PrometheusRules can be sent to its API server.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailor.devcluster.cluster import DevCluster, state_root
from tailor.devcluster.kube import Kube, create_namespace, delete_namespace, wait_established
from tests.chart.helpers import FIXTURES


@pytest.fixture(scope="session")
def chart_cluster() -> Iterator[Kube]:
    """A dev control plane for the chart tests, with the monitoring CRD stand-ins."""
    keep = os.environ.get("TAILOR_KEEP_CLUSTER") == "1"
    base = os.environ.get("TAILOR_TEST_CLUSTER_DIR")
    name = "pytest-chart" if keep else f"pytest-chart-{os.getpid()}"  # clean, and this session's
    directory = Path(f"{base}-{name.removeprefix('pytest-')}") if base else state_root() / name
    cluster = DevCluster(directory)
    cluster.up(timeout=300)
    kube = Kube(cluster.kubeconfig)
    out = kube.kubectl(
        "apply", "--server-side", "-o", "name", "-f", str(FIXTURES / "monitoring-crds.yaml")
    ).stdout
    wait_established(kube.kubeconfig, [line.split("/", 1)[1] for line in out.split()])
    yield kube
    if not keep:
        cluster.down(purge=True)


@pytest.fixture
def chart_namespace(chart_cluster: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace of the chart cluster for one test."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"c-{slug}-{secrets.token_hex(3)}"
    create_namespace(chart_cluster, name)
    yield name
    delete_namespace(chart_cluster, name)
