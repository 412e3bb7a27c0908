"""Artifacts in S3-compatible object storage (AWS S3, GCS's S3 API, MinIO, Ceph RGW,
SeaweedFS), through boto3.

The bucket mirrors the artifacts volume: the folder ``<artifacts>/<rel>`` of a workload is
the key prefix ``<prefix>/<rel>/`` of the bucket, so builders, status URIs and workloads
name the same paths with either store. A folder is uploaded file by file and then a
**completion marker** (``tailor-upload.json``: every file with its sha256 and size) is
written last; a folder without its marker (an upload killed half-way) is never taken as an
artifact, and a download checks every file against the marker before the folder appears
(downloaded into a temporary folder, renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tailor.api.workloads import ObjectStore, Paths
from tailor.workloads.errors import RetryableError, WorkloadError

log = logging.getLogger(__name__)

MARKER = "tailor-upload.json"
"""Written last into every uploaded folder: the list of its files with checksums."""

MULTIPART_BYTES = 64 << 20
"""Files above this go up and down in parts, several at once (boto3's transfer manager)."""

CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden"}


class Store:
    """One bucket and prefix; paths are relative to the artifacts root."""

    def __init__(self, config: ObjectStore, root: str | Path):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.config = config
        self.root = Path(root)
        key_id, secret = self._credentials()
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint,
            region_name=config.region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(
                s3={"addressing_style": config.addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=16,
                # Checksums only where the server asks: several S3-compatible servers
                # reject the newer default trailing checksums.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES // 4,
            max_concurrency=8,
        )

    # -- names ------------------------------------------------------------------------------

    def _credentials(self) -> tuple[str | None, str | None]:
        """The access key pair from the mounted Secret's files (None: the SDK's chain)."""
        cfg = self.config
        if not cfg.secret_name:
            return None, None
        folder = Path(cfg.credentials_dir or f"/etc/tailor/secrets/{cfg.secret_name}")
        values = []
        for key in (cfg.access_key_id_key, cfg.secret_access_key_key):
            try:
                values.append((folder / key).read_text().strip())
            except OSError as exc:
                raise WorkloadError(
                    "StoreCredentialsMissing",
                    f"the object store's Secret {cfg.secret_name} has no key {key} "
                    f"({exc.strerror}); add it (kubectl create secret generic "
                    f"{cfg.secret_name} --from-literal={key}=...)",
                ) from exc
        return values[0], values[1]

    def holds(self, local: str | Path) -> bool:
        """Whether a local path is under the artifacts root (so the bucket mirrors it)."""
        return Path(local).resolve().is_relative_to(self.root.resolve())

    def relative(self, local: str | Path) -> str:
        """The path of a local folder under the artifacts root, as the bucket names it."""
        if not self.holds(local):
            raise ValueError(f"{local} is not under the artifacts root {self.root}")
        return relative_key(Path(local), self.root)

    def key(self, rel: str) -> str:
        return self.config.key(rel)

    def uri(self, rel: str) -> str:
        """The folder's URI, as ``status.artifact.uri`` names it (with a trailing /)."""
        return self.config.uri(rel) + "/"

    # -- errors -----------------------------------------------------------------------------

    def _explain(self, exc: Exception, doing: str) -> WorkloadError:
        """A store failure as the reason and message the operator puts in a condition."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        cfg = self.config
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in CREDENTIAL_ERRORS or code == "403":
                where = (
                    f"the Secret {cfg.secret_name} (keys {cfg.access_key_id_key}, "
                    f"{cfg.secret_access_key_key})"
                    if cfg.secret_name
                    else "the SDK's default credentials (no Secret is set)"
                )
                return WorkloadError(
                    "StoreCredentialsInvalid",
                    f"{doing}: the object store refused {where} ({code}) for bucket "
                    f"{cfg.bucket}; fix the keys or the bucket policy",
                )
            if code == "NoSuchBucket":
                return WorkloadError(
                    "StoreBucketMissing",
                    f"{doing}: bucket {cfg.bucket} does not exist at "
                    f"{cfg.endpoint or 'AWS'}; create it or fix the store's bucket",
                )
            return RetryableError("StoreError", f"{doing}: {code}: {exc}")
        if isinstance(exc, EndpointConnectionError):
            return RetryableError(
                "StoreUnreachable", f"{doing}: cannot reach {cfg.endpoint}: {exc}"
            )
        return RetryableError("StoreError", f"{doing}: {exc}")

    def _call(self, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WorkloadError:
            raise
        except Exception as exc:  # botocore's errors, connection errors
            raise self._explain(exc, doing) from exc

    # -- folders ----------------------------------------------------------------------------

    def marker(self, rel: str) -> dict[str, Any] | None:
        """The completion marker of a folder, or None when it is absent (not uploaded, or
        an upload that did not finish)."""
        from botocore.exceptions import ClientError

        key = f"{self.key(rel)}/{MARKER}"
        try:
            body = self.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise self._explain(exc, f"reading {self.uri(rel)}") from exc
        except Exception as exc:
            raise self._explain(exc, f"reading {self.uri(rel)}") from exc
        marker: dict[str, Any] = json.loads(body)
        return marker

    def push(self, local: str | Path, rel: str | None = None) -> dict[str, Any]:
        """Upload a folder: its files (several at once), then the marker. An earlier marker
        at the same place is removed first, so a replaced folder is never half-complete
        under an old marker. Returns the marker."""
        folder = Path(local)
        rel = self.relative(folder) if rel is None else rel.strip("/")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
        entries: list[dict[str, Any]] = [
            {
                "path": p.relative_to(folder).as_posix(),
                "sha256": sha256_file(p),
                "sizeBytes": p.stat().st_size,
            }
            for p in files
        ]
        bucket, base = self.config.bucket, self.key(rel)
        doing = f"uploading {folder} to {self.uri(rel)}"
        self._call(doing, self.client.delete_object, Bucket=bucket, Key=f"{base}/{MARKER}")

        def upload(entry: dict[str, Any]) -> None:
            self._call(
                doing,
                self.client.upload_file,
                str(folder / entry["path"]),
                bucket,
                f"{base}/{entry['path']}",
                Config=self.transfer,
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(upload, entries))
        total = sum(int(e["sizeBytes"]) for e in entries)
        marker: dict[str, Any] = {
            "files": entries,
            "sizeBytes": total,
            "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        body = json.dumps(marker, indent=1).encode()
        self._call(doing, self.client.put_object, Bucket=bucket, Key=f"{base}/{MARKER}", Body=body)
        log.info("uploaded %d files (%d bytes) to %s", len(entries), total, self.uri(rel))
        return marker

    def pull(self, rel: str, local: str | Path | None = None) -> Path:
        """Download a complete folder into ``local`` (default: the same path under the
        artifacts root), every file checked against the marker. A folder already there with
        the same marker is kept (nothing downloaded). Missing or incomplete: an error."""
        rel = rel.strip("/")
        target = Path(local) if local is not None else self.root / rel
        marker = self.marker(rel)
        if marker is None:
            raise WorkloadError(
                "ArtifactMissing",
                f"{self.uri(rel)} has no complete upload (no {MARKER}): it was never "
                "published, or its upload did not finish",
            )
        have = target / MARKER
        if have.is_file() and json.loads(have.read_text()).get("files") == marker["files"]:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.pull-{uuid.uuid4().hex[:8]}"
        bucket, base = self.config.bucket, self.key(rel)
        doing = f"downloading {self.uri(rel)}"

        def download(entry: dict[str, Any]) -> None:
            path = inside(tmp, entry["path"], f"{self.uri(rel)}{MARKER} entry")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._call(
                doing,
                self.client.download_file,
                bucket,
                f"{base}/{entry['path']}",
                str(path),
                Config=self.transfer,
            )
            if sha256_file(path) != entry["sha256"]:
                raise WorkloadError(
                    "ArtifactCorrupt",
                    f"{self.uri(rel)}{entry['path']}: sha256 differs from its {MARKER}",
                )

        try:
            tmp.mkdir()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(download, marker["files"]))
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded %s to %s", self.uri(rel), target)
        return target

    def objects(self, key: str, exact: bool = False) -> list[tuple[str, int]]:
        """(key, size) of the bucket's objects under a raw key prefix (this Store's prefix
        not applied); ``exact``: only the object named ``key`` itself. Folder placeholders
        (keys ending in /) and completion markers are left out."""
        paginator = self.client.get_paginator("list_objects_v2")
        doing = f"listing s3://{self.config.bucket}/{key}"
        pages = self._call(
            doing, lambda: list(paginator.paginate(Bucket=self.config.bucket, Prefix=key))
        )
        return [
            (item["Key"], int(item["Size"]))
            for page in pages
            for item in page.get("Contents") or []
            if not item["Key"].endswith("/")
            and item["Key"].rsplit("/", 1)[-1] != MARKER
            and (not exact or item["Key"] == key)
        ]

    def complete_children(self, rel: str) -> list[str]:
        """Names of the complete folders directly under ``rel`` (e.g. checkpoints)."""
        prefix = self.key(rel) + "/" if self.key(rel) else ""
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        doing = f"listing {self.uri(rel)}"
        for page in self._call(
            doing, lambda: list(paginator.paginate(Bucket=self.config.bucket, Prefix=prefix))
        ):
            for item in page.get("Contents") or []:
                child, _, name = item["Key"][len(prefix) :].partition("/")
                if name == MARKER:
                    names.add(child)
        return sorted(names)

    # -- single objects (capture segments: each one PUT, complete or absent) -----------------

    def put_file(self, local: str | Path, rel: str) -> None:
        """Upload one file as one object (a single PUT: readers see all of it or nothing)."""
        doing = f"uploading {local} to {self.uri(rel)}"
        body = Path(local).read_bytes()
        self._call(
            doing, self.client.put_object, Bucket=self.config.bucket, Key=self.key(rel), Body=body
        )

    def read(self, rel: str) -> bytes:
        """One object's bytes."""
        doing = f"reading {self.uri(rel)}"
        response = self._call(
            doing, self.client.get_object, Bucket=self.config.bucket, Key=self.key(rel)
        )
        body: bytes = response["Body"].read()
        return body

    def listing(self, rel: str) -> list[str]:
        """Paths (relative to the artifacts root) of every object under the folder ``rel``."""
        base = self.key(rel) + "/"
        root = self.key("")
        cut = len(root) + 1 if root else 0
        return sorted(key[cut:] for key, _ in self.objects(base))

    def remove(self, rels: list[str]) -> None:
        """Delete objects by path."""
        doing = f"deleting under {self.uri('')}"
        for start in range(0, len(rels), 1000):
            batch = [{"Key": self.key(r)} for r in rels[start : start + 1000]]
            self._call(
                doing,
                self.client.delete_objects,
                Bucket=self.config.bucket,
                Delete={"Objects": batch},
            )

    def delete(self, rel: str) -> int:
        """Remove a folder: its marker first (so it stops being complete), then the rest."""
        bucket, base = self.config.bucket, self.key(rel)
        doing = f"deleting {self.uri(rel)}"
        self._call(doing, self.client.delete_object, Bucket=bucket, Key=f"{base}/{MARKER}")
        paginator = self.client.get_paginator("list_objects_v2")
        keys = [
            item["Key"]
            for page in self._call(
                doing, lambda: list(paginator.paginate(Bucket=bucket, Prefix=base + "/"))
            )
            for item in page.get("Contents") or []
        ]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(doing, self.client.delete_objects, Bucket=bucket, Delete={"Objects": batch})
        return len(keys)


def store_of(paths: Paths) -> Store | None:
    """The run's object store, or None when artifacts live on the mounted volume."""
    return Store(paths.store, paths.artifacts) if paths.store else None


def _bucket(paths: Paths, bucket: str, root: Path, uri: str, reason: str) -> Store:
    """A Store on ``bucket`` (no prefix) with the run's S3 connection, rooted at ``root``."""
    connection = paths.s3 or paths.store
    if connection is None:
        raise WorkloadError(
            reason,
            f"{uri} is in S3 but this cluster has no S3 connection: set artifacts.s3.bucket, "
            "artifacts.s3.endpoint and artifacts.s3.secret in the Helm values (the store "
            "can stay pvc), or read it from pvc://",
        )
    return Store(connection.model_copy(update={"bucket": bucket, "prefix": ""}), root)


def pull_data(location: tuple[str, str], paths: Paths, max_bytes: int) -> tuple[Path, list[Path]]:
    """The files of an ``s3://`` data source, downloaded into this pod's scratch folder:
    one object (``s3://bucket/key``) or every object under a folder (``s3://bucket/dir/``,
    or a key with no object of its own). A folder Tailor uploaded (it has the completion
    marker, e.g. a RAFTJob's dataset) is downloaded whole and checked file by file; one
    file of such a folder is checked against its entry. Returns (the local folder that
    mirrors the bucket, the files sorted); nothing there or more than ``max_bytes`` in all:
    an error naming the uri."""

    bucket, key = location
    uri = f"s3://{bucket}/{key}"
    root = Path(tempfile.gettempdir()) / "tailor-data" / bucket
    store = _bucket(paths, bucket, root, uri, "DataStoreMissing")
    doing = f"reading {uri}"
    folder = key.rstrip("/")
    objects = [] if key.endswith("/") else store.objects(key, exact=True)
    if not objects:
        marker = store.marker(folder)
        if marker is not None:
            _fits(int(marker.get("sizeBytes") or 0), max_bytes, uri)
            target = store.pull(folder)
            files = sorted(p for p in target.rglob("*") if p.is_file() and p.name != MARKER)
            return root, files
        objects = store.objects(folder + "/" if folder else "")
    if not objects:
        raise WorkloadError("SourceNotFound", f"{uri} holds no objects; check the bucket and key")
    total = sum(size for _, size in objects)
    _fits(total, max_bytes, uri)
    expected: dict[str, str] = {}
    if len(objects) == 1 and "/" in objects[0][0]:  # one file of a Tailor folder?
        parent, _, name = objects[0][0].rpartition("/")
        marker = store.marker(parent)
        if marker:
            expected = {
                f"{parent}/{e['path']}": e["sha256"] for e in marker["files"] if e["path"] == name
            }
    files = []
    for object_key, _ in objects:
        path = inside(root, object_key, f"s3://{bucket}/ object key")
        path.parent.mkdir(parents=True, exist_ok=True)
        store._call(doing, store.client.download_file, bucket, object_key, str(path))
        if object_key in expected and sha256_file(path) != expected[object_key]:
            raise WorkloadError(
                "ArtifactCorrupt", f"s3://{bucket}/{object_key}: sha256 differs from its {MARKER}"
            )
        files.append(path)
    log.info("downloaded %d objects (%d bytes) of %s", len(files), total, uri)
    return root, sorted(files)


def _fits(total: int, max_bytes: int, uri: str) -> None:
    """SourceTooLarge, before anything is downloaded, when ``total`` exceeds maxBytes."""
    if total > max_bytes:
        raise WorkloadError(
            "SourceTooLarge",
            f"{uri} holds {total} bytes, more than maxBytes {max_bytes}; raise maxBytes",
        )


def pull_model(location: tuple[str, str], paths: Paths) -> Path:
    """An ``s3://<bucket>/<key>/`` model folder, downloaded once into the model cache
    (``<cache>/s3/<bucket>/<key>``) and checked against its upload marker; later loads,
    by this pod or any pod sharing the cache, read it after one small GET of the marker.
    Pods that ask at once wait on a file lock for the first download instead of fetching
    a copy each. The bucket is read with the run's S3 connection (endpoint, region,
    credentials Secret)."""
    import fcntl

    bucket, key = location
    uri = f"s3://{bucket}/{key}/"
    store = _bucket(paths, bucket, cache_root() / "s3" / bucket, uri, "ModelStoreMissing")
    root = store.root
    lock = root / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            return store.pull(key)
        except WorkloadError as exc:
            if exc.reason != "ArtifactMissing":
                raise
            raise WorkloadError(
                "ModelNotFound",
                f"{uri} holds no complete upload ({MARKER} missing): publish the model "
                "there with a FineTuneJob (output in the s3 store) or `tailor store push`",
            ) from exc


def check_manifest(folder: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """A published artifact's ``manifest.json``, after checking that every file it lists is
    in ``folder`` with its size and sha256, and (``expected_sha256``) that the manifest is
    the one the operator recorded in the run's status: a folder rewritten since, manifest
    and all, is refused rather than served."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise WorkloadError("ArtifactMissing", f"{manifest_path}: {exc}") from exc
    if expected_sha256 and sha256_file(manifest_path) != expected_sha256:
        raise WorkloadError(
            "ArtifactCorrupt",
            f"{manifest_path}: sha256 differs from the one its run recorded "
            f"({expected_sha256[:12]}...): the artifact was replaced after it was published",
        )
    for entry in manifest.get("files") or []:
        path = inside(folder, entry["path"], f"{manifest_path} entry")
        if not path.is_file() or path.stat().st_size != entry["sizeBytes"]:
            raise WorkloadError("ArtifactCorrupt", f"{path}: missing or of the wrong size")
        if sha256_file(path) != entry["sha256"]:
            raise WorkloadError("ArtifactCorrupt", f"{path}: sha256 differs from the manifest")
    return dict(manifest)


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


def inside(root: Path, rel: str | Path, what: str) -> Path:
    """``root / rel``, refused unless it stays under ``root`` once resolved (symlinks
    followed): a path a user names, a file their claim links elsewhere, a marker entry or an
    object key never reaches outside its folder (a mounted Secret, another tenant's cache).
    The CRDs refuse '..' and absolute paths first; this is the check that holds on the pod."""
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise WorkloadError(
            "PathOutsideRoot",
            f"{what} {str(rel)!r} leads outside {root}: use a path under it, without '..', "
            "a leading '/' or a symbolic link that points elsewhere",
        )
    return path


def relative_key(path: Path, root: Path) -> str:
    """A folder's path under the artifacts root, as the object store names it."""
    return path.resolve().relative_to(root.resolve()).as_posix()


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tailor" / "models"
    return Path(os.environ.get("TAILOR_MODEL_CACHE", default))
