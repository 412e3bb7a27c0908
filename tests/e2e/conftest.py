"""The local-runtime operator fixture shared by the end-to-end flows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tailor.devcluster.kube import Kube
from tests.e2e.helpers import LocalOperator, operating, run_local_operator


@pytest.fixture
def local_operator(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[Path]:
    yield from run_local_operator(kube, namespace, tmp_path, {})


@pytest.fixture
def restartable_operator(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[LocalOperator]:
    """The local-runtime operator as an object a test may kill and start again."""
    yield from operating(kube, namespace, tmp_path, {})
