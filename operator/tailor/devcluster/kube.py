"""kubectl helpers shared by the cluster tests, the operator tests and the quickstart.

``Kube`` runs the packaged kubectl against one kubeconfig and returns the
``CompletedProcess``; ``apply_crds`` installs every CRD manifest of a directory
with server-side apply and ``wait_established`` waits until the API server
serves them. ``create_namespace`` / ``delete_namespace`` give a test an isolated
namespace that is ready for pods (its default ServiceAccount exists).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.devcluster.tools import kubectl_path


class KubectlError(RuntimeError):
    """kubectl exited non-zero where success was required."""


@dataclass(frozen=True)
class Kube:
    """A kubeconfig plus a way to run kubectl against it."""

    kubeconfig: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl ARGS`` (text mode); raise ``KubectlError`` on failure if ``check``."""
        argv = [str(kubectl_path()), *args]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise KubectlError(
                f"kubectl {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def get_json(self, *args: str) -> Any:
        """``kubectl get ARGS -o json``, decoded."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(
        self, manifest: dict[str, Any] | list[dict[str, Any]], *flags: str
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` of one object or a list of objects."""
        body = (
            manifest
            if isinstance(manifest, dict)
            else {"apiVersion": "v1", "kind": "List", "items": manifest}
        )
        return self.kubectl("apply", *flags, "-f", "-", input=json.dumps(body))


def apply_crds(kubeconfig: Path, directory: Path) -> list[str]:
    """Server-side apply every ``*.yaml`` under ``directory``; returns the CRD names."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no *.yaml CRD manifests in {directory}")
    args = [
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=tailor-devcluster",
        "-o",
        "name",
    ]
    for file in files:
        args += ["-f", str(file)]
    output = Kube(kubeconfig).kubectl(*args).stdout
    return [
        line.split("/", 1)[1]
        for line in output.split()
        if line.startswith("customresourcedefinition")
    ]


def wait_established(kubeconfig: Path, names: list[str], timeout: float = 60.0) -> None:
    """Wait until each CRD is Established and listed by discovery.

    The last step also refreshes kubectl's discovery cache, which would otherwise
    keep answering "the server doesn't have a resource type" for a while.
    """
    if not names:
        return
    kube = Kube(kubeconfig)
    crds = [f"crd/{name}" for name in names]
    for condition in ("Established", "NamesAccepted"):
        kube.kubectl(
            "wait",
            f"--for=condition={condition}",
            f"--timeout={timeout:.0f}s",
            *crds,
            timeout=timeout + 30,
        )
    deadline = time.monotonic() + timeout
    for group in sorted({name.split(".", 1)[1] for name in names}):
        wanted = {name for name in names if name.split(".", 1)[1] == group}
        while True:
            listed = kube.kubectl("api-resources", f"--api-group={group}", "-o", "name").stdout
            if wanted <= set(listed.split()):
                break
            if time.monotonic() > deadline:
                raise KubectlError(
                    f"discovery does not list {sorted(wanted - set(listed.split()))}"
                )
            time.sleep(0.5)


def create_namespace(kube: Kube, name: str, timeout: float = 60.0) -> None:
    """Create a namespace and wait for its default ServiceAccount, so pods can be created."""
    kube.kubectl("create", "namespace", name)
    deadline = time.monotonic() + timeout
    while kube.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        if time.monotonic() > deadline:
            raise KubectlError(f"namespace {name}: no default ServiceAccount after {timeout:.0f}s")
        time.sleep(0.2)


def delete_namespace(kube: Kube, name: str) -> None:
    """Start deleting a namespace; the namespace controller finishes the job in the background."""
    kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
