"""Fixtures of the cluster tests: the operator (``tailor operator run``, Kubernetes runtime)
as a child process for a module, and a namespace it serves."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import OperatorProcess


@pytest.fixture(scope="module")
def operator_process(
    kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(kube, log)
    op.start()
    yield op
    op.stop()
    if os.environ.get("TAILOR_SHOW_OPERATOR_LOG"):
        print(log.read_text()[-20000:])


@pytest.fixture
def ns(kube: Kube, namespace: str, operator_process: OperatorProcess) -> str:
    """A test namespace (its artifacts claim binds through the dev cluster's default
    StorageClass and provisioner)."""
    return namespace
