"""Build the dev cluster's binaries from Go modules, once per version.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and the
hostPath volume provisioner are compiled with the local Go toolchain (CGO_ENABLED=0, -trimpath) from the small
wrapper modules under ``go/`` (kwok with ``go install``), with version ldflags so
that each binary reports its real release. Results are cached under
``${XDG_CACHE_HOME:-~/.cache}/tailor/devcluster/<component>-<version>/``; a
directory there is complete or absent (builds go to a temporary directory that
is renamed into place), so a second run builds nothing. Go's own build and
module caches (GOCACHE, GOMODCACHE) are left at their defaults and persist.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GO_DIR = Path(__file__).resolve().parent / "go"

# To bump a version: change it here and in go/<module>/go.mod (for kubernetes also
# every k8s.io/* replace to the matching v0.x.y), then run "go mod tidy" there.
ETCD_VERSION = "v3.6.16"
KUBERNETES_VERSION = "v1.36.4"
KWOK_VERSION = "v0.8.0"
# The dev cluster's dynamic volume provisioner (go/provisioner) on SIG Storage's
# sig-storage-lib-external-provisioner; the cache key also hashes our sources.
PROVISIONER_LIBRARY = "v13.1.0"


class BuildError(RuntimeError):
    """A component could not be built; the message holds Go's output."""


@dataclass(frozen=True)
class Component:
    """One cached build: its binaries come out of a single Go invocation."""

    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


ETCD = Component("etcd", ETCD_VERSION, ("etcd",))
KUBERNETES = Component(
    "kubernetes",
    KUBERNETES_VERSION,
    ("kube-apiserver", "kube-controller-manager", "kube-scheduler"),
)
KWOK = Component("kwok", KWOK_VERSION, ("kwok",))


def _sources_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        if (folder / name).exists():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:10]


PROVISIONER = Component(
    "hostpath-provisioner",
    f"{PROVISIONER_LIBRARY}-{_sources_digest(GO_DIR / 'provisioner')}",
    ("hostpath-provisioner",),
)
# The dev S3 server (tailor.devcluster.s3): SeaweedFS at a commit the module proxy serves;
# go/seaweedfs pins it (a wrapper module, since SeaweedFS's go.mod has a replace).
SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
SEAWEEDFS = Component(
    "seaweedfs", f"{SEAWEEDFS_VERSION}-{_sources_digest(GO_DIR / 'seaweedfs')}", ("weed",)
)
# GPU quotas (tailor.devcluster.kueue): Kueue's manager built from the module proxy. Its
# visibility API server writes its serving certificate to a fixed folder; the build points
# that folder at a path relative to the process's working directory (its state directory).
KUEUE_VERSION = "v0.17.0"
KUEUE = Component("kueue", KUEUE_VERSION, ("kueue",))
KUEUE_MODULE = "sigs.k8s.io/kueue"
COMPONENTS = (ETCD, KWOK, KUBERNETES, PROVISIONER)
"""What the control plane needs; ``build`` (the Makefile's devcluster-build) also builds
SEAWEEDFS for the object-store tests and KUEUE for the queue tests."""
ALL_COMPONENTS = (*COMPONENTS, SEAWEEDFS, KUEUE)


def cache_root() -> Path:
    """Where built binaries live: ``${XDG_CACHE_HOME:-~/.cache}/tailor/devcluster``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tailor" / "devcluster"


def component_dir(component: Component) -> Path:
    return cache_root() / component.key


def is_built(component: Component) -> bool:
    folder = component_dir(component)
    return all(os.access(folder / b, os.X_OK) for b in component.binaries)


def ensure_binaries(
    log: Callable[[str], None] | None = None,
    components: tuple[Component, ...] = COMPONENTS,
) -> dict[str, Path]:
    """Build every missing component and return ``{binary name: path}``."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    paths: dict[str, Path] = {}
    for component in components:
        if not is_built(component):
            with _build_lock():
                if not is_built(component):  # another process may have built it meanwhile
                    say(f"building {component.key} with Go (cached afterwards) ...")
                    started = time.monotonic()
                    build(component)
                    say(f"built {component.key} in {time.monotonic() - started:.0f}s")
        for binary in component.binaries:
            paths[binary] = component_dir(component) / binary
    return paths


@contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time per cache, across processes."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(component: Component) -> None:
    """Compile one component into its cache directory, replacing nothing on failure."""
    final = component_dir(component)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{component.key}-", dir=final.parent))
    try:
        for argv, cwd in _go_commands(component, work):
            _run_go(argv, cwd, work)
        if component is KUEUE:
            _copy_kueue_manifests(work)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _go_commands(component: Component, out: Path) -> list[tuple[list[str], Path]]:
    go = go_binary()
    if component is ETCD:
        return [([go, "build", "-o", str(out / "etcd"), "-ldflags", "-s -w", "."], GO_DIR / "etcd")]
    if component is KWOK:
        ldflags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}"
        package = f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"
        return [([go, "install", "-ldflags", ldflags, package], out)]
    if component is SEAWEEDFS:
        package = "github.com/seaweedfs/seaweedfs/weed"
        return [
            (
                [go, "build", "-o", str(out / "weed"), "-ldflags", "-s -w", package],
                GO_DIR / "seaweedfs",
            )
        ]
    if component is KUEUE:
        ldflags = f"-s -w -X {KUEUE_MODULE}/pkg/visibility.certDir=visibility-certs"
        package = f"{KUEUE_MODULE}/cmd/kueue@{KUEUE_VERSION}"
        return [([go, "install", "-ldflags", ldflags, package], out)]
    if component is PROVISIONER:
        argv = [go, "build", "-o", str(out / "hostpath-provisioner"), "-ldflags", "-s -w", "."]
        return [(argv, GO_DIR / "provisioner")]
    commands = [f"./cmd/{binary}" for binary in component.binaries]
    argv = [go, "build", "-o", str(out) + os.sep, "-ldflags", _kubernetes_ldflags(), *commands]
    return [(argv, GO_DIR / "kube")]


def _copy_kueue_manifests(out: Path) -> None:
    """Kueue's CRDs and webhook manifests, from the module the binary was built from."""
    found = subprocess.run(
        [go_binary(), "mod", "download", "-json", f"{KUEUE_MODULE}@{KUEUE_VERSION}"],
        cwd=out,
        env=_go_env(out) | {"GOFLAGS": "-mod=mod"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        raise BuildError(f"locating {KUEUE_MODULE}@{KUEUE_VERSION}: {found.stderr[-2000:]}")
    components = Path(json.loads(found.stdout)["Dir"]) / "config" / "components"
    shutil.copytree(components / "crd", out / "config" / "crd")
    shutil.copy(components / "webhook" / "manifests.yaml", out / "config" / "webhooks.yaml")


def _kubernetes_ldflags() -> str:
    """The ``-X`` flags that hack/lib/version.sh sets for a release build."""
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in values.items()]
    return " ".join(flags)


def go_binary() -> str:
    found = shutil.which("go") or next(
        (str(p) for p in (Path("/usr/local/go/bin/go"), Path.home() / "go/bin/go") if p.exists()),
        None,
    )
    if found is None:
        raise BuildError(
            "the dev cluster is built from source and needs Go >= 1.26 on PATH "
            "(https://go.dev/dl/); no 'go' command was found"
        )
    return found


def _go_env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOFLAGS="-trimpath -buildvcs=false",
        GOWORK="off",
        GOBIN=str(out),
    )
    return env


def _run_go(argv: list[str], cwd: Path, out: Path) -> None:
    result = subprocess.run(
        argv, cwd=cwd, env=_go_env(out), stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise BuildError(f"{' '.join(argv)} failed in {cwd} (exit {result.returncode}):\n{output}")
