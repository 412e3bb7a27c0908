"""What the chart tests share: the chart's paths, ``helm`` and ``helm template``. Fixtures are
in conftest.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tailor.devcluster.kube import Kube
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


IMAGES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/team/tailor-operator"},
    "workloads": {"image": {"repository": "registry.example.com/team/tailor-workloads"}},
}
"""Where the images were pushed (the chart requires it: nobody publishes them)."""


def with_images(values: dict[str, Any], defaults: dict[str, Any] = IMAGES) -> dict[str, Any]:
    """``values`` with the image repositories filled in where it names none."""
    out = dict(values)
    for key, default in defaults.items():
        if isinstance(default, dict):
            out[key] = with_images(dict(out.get(key) or {}), default)
        else:
            out.setdefault(key, default)
    return out


def helm(
    *args: str, values: dict[str, Any] | None = None, kube: Kube | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run helm (the packaged binary), values given as a YAML document on stdin (with the
    image repositories of :data:`IMAGES` unless they name their own)."""
    argv = [str(helm_path()), *args]
    if values is not None:
        values = with_images(values)
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
    """The objects ``helm template`` renders (release "tailor", namespace "tailor-system"):
    what an install creates, without hooks (``render(values, "--hooks")`` adds them)."""
    hooks = "--hooks" in flags
    flags = tuple(f for f in flags if f != "--hooks")
    out = helm(
        "template",
        "tailor",
        str(CHART),
        "--namespace",
        "tailor-system",
        *flags,
        *([] if hooks else ["--no-hooks"]),
        values=values or {},
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out
