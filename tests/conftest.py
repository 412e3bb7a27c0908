"""Shared pytest setup: offline model hubs, repository paths and the APIBench data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may download from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
from tailor.data import apibench_dir  # noqa: E402

APIBENCH = apibench_dir()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def apibench() -> Path:
    if not (APIBENCH / "torchhub_api.jsonl").exists():
        pytest.fail(f"APIBench data not found at {APIBENCH}; set TAILOR_APIBENCH")
    return APIBENCH


# The control-plane fixtures (dev_cluster, kube, namespace) for every test folder; they
# start nothing until a test asks for them.
pytest_plugins = ["tests.cluster_fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use Kueue run last (in their order): Kueue starts once on the session
    cluster, and the tests before it check a cluster without Kueue."""
    items.sort(key=lambda item: "kueue" in getattr(item, "fixturenames", ()))
