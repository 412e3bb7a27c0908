"""Fixtures for tests that need the real control plane (tests/cluster, tests/e2e, tests/chart,
tests/security/cluster): one real control plane per session (per xdist worker that needs
one), one namespace per test, the operator as a child process per module, Kueue started once
for the tests that ask for it (they run last: see ``pytest_collection_modifyitems`` in
conftest.py).

The session cluster lives in its own state directory (``$TAILOR_TEST_CLUSTER_DIR``,
else ``<state root>/pytest``, with ``-gw0``, ``-gw1``... appended under xdist) so it never
touches a developer's ``default`` cluster. It is stopped at the end of the session unless
``TAILOR_KEEP_CLUSTER=1``, in which case the next session reuses it in a second or two.
Every ``crds/*.yaml`` is installed with server-side apply before the first test.
"""

from __future__ import annotations

import os
import re
import secrets
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailor.devcluster.cluster import DevCluster, state_root
from tailor.devcluster.kube import (
    Kube,
    apply_crds,
    create_namespace,
    delete_namespace,
    wait_established,
)
from tailor.devcluster.kueue import Kueue
from tailor.devcluster.s3 import S3Server
from tests.cluster.helpers import OperatorProcess

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "crds"


def per_worker(directory: Path) -> Path:
    """``directory`` for this process: each xdist worker (gw0, gw1, ...) that needs a
    control plane or an S3 server starts its own, in a directory of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return directory.with_name(f"{directory.name}-{worker}") if worker else directory


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevCluster]:
    directory = os.environ.get("TAILOR_TEST_CLUSTER_DIR")
    cluster = DevCluster(per_worker(Path(directory) if directory else state_root() / "pytest"))
    cluster.up(timeout=300)
    if kueue_installed(cluster):
        # Kept from a session that ran the Kueue tests (a kept or killed one): Kueue's
        # objects hold finalizers only a running Kueue removes, so its CRDs cannot simply
        # be deleted. Start from an empty cluster, as the tests before Kueue's expect.
        Kueue(cluster).down()
        cluster.down(purge=True)
        cluster.up(timeout=300)
    yield cluster
    if os.environ.get("TAILOR_KEEP_CLUSTER") != "1":
        Kueue(cluster).down()
        cluster.down(purge=True)


def kueue_installed(cluster: DevCluster) -> bool:
    try:
        cluster.api("/apis/kueue.x-k8s.io")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The dev S3 server (SeaweedFS), started once per session."""
    server = S3Server(per_worker(state_root() / "s3-pytest"))
    server.up()
    yield server
    if os.environ.get("TAILOR_KEEP_CLUSTER") != "1":
        server.down()


@pytest.fixture
def bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket for one test, deleted with its objects afterwards (SeaweedFS gives
    each bucket volumes of its own)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    s3_server.create_bucket(name)
    yield name
    s3_server.delete_bucket(name)


@pytest.fixture(scope="session")
def crd_names(dev_cluster: DevCluster) -> list[str]:
    """Names of the CRDs installed from crds/ (empty while crds/ has none)."""
    if not any(CRD_DIR.glob("*.yaml")):
        return []
    names = apply_crds(dev_cluster.kubeconfig, CRD_DIR)
    wait_established(dev_cluster.kubeconfig, names)
    return names


@pytest.fixture(scope="session")
def kube(dev_cluster: DevCluster, crd_names: list[str]) -> Kube:
    """The session cluster's kubeconfig and kubectl, with Tailor's CRDs installed."""
    return Kube(dev_cluster.kubeconfig)


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount) for one test, deleted afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    create_namespace(kube, name)
    yield name
    delete_namespace(kube, name)


@pytest.fixture(scope="module")
def operator_process(
    kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator (``tailor operator run``, Kubernetes runtime) as a child process for a
    module; ``TAILOR_SHOW_OPERATOR_LOG=1`` prints its log's tail afterwards."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(kube, log)
    op.start()
    yield op
    op.stop()
    if os.environ.get("TAILOR_SHOW_OPERATOR_LOG"):
        print(log.read_text()[-20000:])


@pytest.fixture
def ns(kube: Kube, namespace: str, operator_process: OperatorProcess) -> str:
    """A test namespace served by the module's operator (its artifacts claim binds through
    the dev cluster's default StorageClass and provisioner)."""
    return namespace


@pytest.fixture(scope="session")
def kueue(dev_cluster: DevCluster, kube: Kube) -> Iterator[Kueue]:
    """Kueue on the session cluster, started once. Tests isolate by namespace and by
    ClusterQueues of their own; they run after every other test, so the tests of a cluster
    without Kueue see none."""
    running = Kueue(dev_cluster)
    running.up()
    yield running
    running.down()
