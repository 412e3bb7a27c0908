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
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tailor.devcluster.cluster import DevCluster, state_root
from tailor.devcluster.kube import Kube, create_namespace, delete_namespace, wait_established
from tailor.devcluster.tools import helm_path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tailor"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

EVERY_TOGGLE: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "podMonitors": {
        "trainers": {"enabled": True},
        "indexers": {"enabled": True},
        "servers": {"enabled": True},
    },
    "prometheusRule": {"enabled": True},
    "dashboards": {"enabled": True},
    "qdrant": {"enabled": True},
}


def helm(
    *args: str, values: dict[str, Any] | None = None, kube: Kube | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run helm (the packaged binary), values given as a YAML document on stdin."""
    argv = [str(helm_path()), *args]
    if values is not None:
        argv += ["--values", "-"]
    env = {**os.environ, "HELM_CACHE_HOME": str(ROOT / ".pytest_cache" / "helm")}
    if kube is not None:
        env["KUBECONFIG"] = str(kube.kubeconfig)
    result = subprocess.run(
        argv,
        input=yaml.safe_dump(values) if values is not None else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def render(values: dict[str, Any] | None = None, *flags: str) -> list[dict[str, Any]]:
    """The objects ``helm template`` renders (release "tailor", namespace "tailor-system")."""
    out = helm(
        "template",
        "tailor",
        str(CHART),
        "--namespace",
        "tailor-system",
        *flags,
        values=values or {},
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


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
