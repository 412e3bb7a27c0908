"""Shared pytest setup: offline model hubs, repository paths and the APIBench data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    cluster, and the tests before it check a cluster without Kueue. The control planes'
    tests come first, then the other modules, longest first as measured in
    ``tests/durations.json`` (unmeasured modules first: they may be long), tests/unit last:
    under xdist no long module starts when the others are nearly done. The sorts are
    stable."""
    items.sort(key=lambda item: "kueue" in getattr(item, "fixturenames", ()))
    units = {item: work_unit(item.nodeid) for item in items}
    seconds = measured_seconds_by_file()
    items.sort(
        key=lambda item: (
            units[item] not in CONTROL_PLANE_UNITS,
            units[item].startswith("tests/unit"),
            -seconds.get(units[item], float("inf")),
        )
    )


# Seconds per test file from a full run, committed so that a fresh clone (CI) hands the
# modules out in the same order as this machine; ``make test-durations`` rewrites it from the
# last run's JUnit report. Not the last report itself: a run of one file would overwrite it.
DURATIONS = ROOT / "tests" / "durations.json"


def measured_seconds_by_file() -> dict[str, float]:
    import json

    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def seconds_by_file(junit: Path) -> dict[str, float]:
    """Seconds each test file took in a JUnit report."""
    import xml.etree.ElementTree as ElementTree

    seconds: dict[str, float] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        seconds[path] = seconds.get(path, 0.0) + float(case.get("time") or 0)
    return seconds


# Parallel runs (pytest-xdist; ``make test`` runs three workers on two cores). A worker takes
# a work unit whole, so each unit sets up its expensive things once:
# - tests/cluster, tests/chart and tests/security/cluster share one control plane (and
#   Kueue, last);
# - the end-to-end flows (tests/e2e) share another, so the two run side by side;
# - every other module is a unit of its own: its module fixtures (a loaded model, a
#   trained adapter) are set up on one worker only.
# Units are handed out in collection order (above): the control planes first, one to each
# of two workers, while the others start on the modules. (By path, not by xdist_group
# marks: xdist 3.8 cannot rename pytest 9.2's node ids.)
CONTROL_PLANE_UNITS = ("control-plane", "e2e-control-plane")


def work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/e2e/"):
        return "e2e-control-plane"
    if path.startswith(("tests/cluster/", "tests/chart/", "tests/security/cluster/")):
        return "control-plane"
    return path


@pytest.hookimpl(optionalhook=True)  # `pytest -p no:xdist` runs without the plugin
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the collection order above
    return WorkUnits(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, torch in each worker (and in the workload processes it starts) gets its
    share of the cores: two workers each running two spinning OpenMP threads on two cores
    run every step several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
