"""Fixtures of the workload tests: one torch thread, and a volume with the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.workloads.helpers import tiny_model_volume


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: on a busy shared machine, OpenMP threads waiting on each other
    make tiny steps many times slower, and one thread gives the same results everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pvcs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume root holding ``models/tiny`` (see helpers.tiny_model_volume)."""
    return tiny_model_volume(tmp_path_factory.mktemp("pvcs"))
