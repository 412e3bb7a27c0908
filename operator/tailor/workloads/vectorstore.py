"""Qdrant access for knowledge bases: versioned collections behind an alias, server or embedded.

A knowledge base lives in collections named ``<alias>-v<N>``; readers query the alias, and a
build publishes a new version by moving the alias to it in one step, only once it is
complete. Two stores implement that:

- :class:`AliasStore`, a Qdrant server (or any ``QdrantClient``): the alias is a real Qdrant
  alias, moved with one ``update_collection_aliases`` call holding the delete and the create,
  so queries see the old version or the new one, never neither.
- :class:`EmbeddedStore`, qdrant-client's embedded mode on a folder. Embedded Qdrant does
  support aliases, but it takes an exclusive lock on its storage folder for as long as a
  client is open, so a server process reading the index and an index Job writing the next
  version could not share one folder. Each version therefore gets its own folder
  ``<root>/<alias>-v<N>/``, written by the index Job alone and never changed once
  published, and the alias is a small pointer file ``<root>/<alias>.json`` replaced
  atomically (``os.replace``). Readers copy the published folder to a private temporary
  folder and open the copy: they never take the lock on the shared folder, they work on a
  read-only mount, and they switch to a new version when the pointer file changes.

Each point has a dense vector ``dense`` (cosine) and a sparse vector ``bm25``: BM25 term
weights over the embedding tokenizer's token ids, with Qdrant's IDF modifier supplying the
inverse document frequency at query time, for hybrid search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from tailor.api.knowledgebase import QdrantStore
from tailor.api.workloads import Paths, RetrieverConfig
from tailor.workloads.common import read_secret

log = logging.getLogger("tailor.workloads.vectorstore")

DENSE = "dense"
SPARSE = "bm25"
BM25_K1 = 1.2
BM25_B = 0.75
PAYLOAD_INDEXES = ("hash", "document_id", "source")
SNAPSHOT_CACHE_SIZE = 4


class StoreUnavailable(Exception):
    """The vector store cannot be reached, or holds no index under the alias."""


def point_id(key: str) -> str:
    """A Qdrant point id (a UUID) derived from ``key``: stable across runs."""
    return str(uuid.UUID(hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]))


def bm25_document_vector(token_ids: Sequence[int], average_length: float) -> models.SparseVector:
    """The BM25 term-frequency part of a chunk's weights; Qdrant multiplies in the IDF."""
    counts = Counter(token_ids)
    norm = BM25_K1 * (1 - BM25_B + BM25_B * len(token_ids) / max(average_length, 1.0))
    indices = sorted(counts)
    values = [counts[i] * (BM25_K1 + 1) / (counts[i] + norm) for i in indices]
    return models.SparseVector(indices=indices, values=values)


def bm25_query_vector(token_ids: Sequence[int]) -> models.SparseVector:
    """A query's sparse vector: each distinct token once (scored by the IDF modifier)."""
    indices = sorted(set(token_ids))
    return models.SparseVector(indices=indices, values=[1.0] * len(indices))


def collection_options(store: QdrantStore) -> dict[str, Any]:
    """Keyword arguments of ``create_collection`` for shards, replicas and quantization."""
    options: dict[str, Any] = {
        "shard_number": store.shards,
        "replication_factor": store.replicas,
    }
    if store.quantization == "scalar":
        options["quantization_config"] = models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
        )
    elif store.quantization == "binary":
        options["quantization_config"] = models.BinaryQuantization(
            binary=models.BinaryQuantizationConfig(always_ram=True)
        )
    return options


def version_name(alias: str, number: int) -> str:
    return f"{alias}-v{number}"


def version_number(alias: str, name: str) -> int | None:
    """N for a collection named ``<alias>-v<N>``, else None."""
    match = re.fullmatch(re.escape(alias) + r"-v(\d+)", name)
    return int(match.group(1)) if match else None


def create_collection(
    client: QdrantClient,
    name: str,
    dimension: int,
    options: dict[str, Any],
    metadata: dict[str, Any],
    payload_indexes: bool = True,
) -> None:
    """Create a knowledge-base collection: ``dense`` cosine vectors, ``bm25`` sparse vectors.

    ``payload_indexes`` indexes the fields filters and refreshes look up (a Qdrant server
    uses them; embedded Qdrant has none and warns).
    """
    client.create_collection(
        name,
        vectors_config={
            DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)
        },
        sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
        metadata=metadata,
        **options,
    )
    for field in PAYLOAD_INDEXES if payload_indexes else ():
        client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)


class VectorStore(ABC):
    """Versioned collections behind an alias."""

    @abstractmethod
    def active(self, alias: str) -> str | None:
        """The collection the alias points at, or None before the first build."""

    @abstractmethod
    def versions(self, alias: str) -> list[str]:
        """Every ``<alias>-v<N>`` collection, oldest first."""

    @abstractmethod
    def create(
        self, name: str, dimension: int, options: dict[str, Any], metadata: dict[str, Any]
    ) -> QdrantClient:
        """Create collection ``name``; returns the client to write it with."""

    @abstractmethod
    def finish(self, name: str) -> None:
        """Writing ``name`` is done (and was successful)."""

    @abstractmethod
    def publish(self, alias: str, name: str) -> None:
        """Point the alias at ``name`` in one step."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete collection ``name`` (and whatever a writer held open for it)."""

    @abstractmethod
    def unpublish(self, alias: str) -> None:
        """Remove the alias (readers then find no index)."""

    @abstractmethod
    def reader(self, name: str) -> QdrantClient:
        """A client that can read collection ``name`` (a published version)."""

    @abstractmethod
    def searchable(self, alias: str) -> tuple[QdrantClient, str]:
        """A client and collection name to query the alias with, following it when it moves."""

    @abstractmethod
    def close(self) -> None:
        """Release clients and files."""

    def next_version(self, alias: str) -> str:
        numbers = [version_number(alias, name) or 0 for name in self.versions(alias)]
        return version_name(alias, max(numbers, default=0) + 1)

    def discard_unpublished(self, alias: str) -> list[str]:
        """Delete versions newer than the active one: leftovers of builds that died."""
        active = self.active(alias)
        floor = version_number(alias, active) if active else 0
        stale = [n for n in self.versions(alias) if (version_number(alias, n) or 0) > (floor or 0)]
        for name in stale:
            log.info("deleting %s, left by an unfinished build", name)
            self.delete(name)
        return stale

    def remove(self, alias: str) -> list[str]:
        """Remove the alias and every version behind it (the KnowledgeBase was deleted)."""
        self.unpublish(alias)
        versions = self.versions(alias)
        for name in versions:
            self.delete(name)
        return versions

    def prune(self, alias: str, keep: int) -> list[str]:
        """Delete versions older than the active one beyond the ``keep`` newest of them."""
        active = self.active(alias)
        if active is None:
            return []
        floor = version_number(alias, active) or 0
        older = [n for n in self.versions(alias) if (version_number(alias, n) or 0) < floor]
        doomed = older[: max(len(older) - keep, 0)]
        for name in doomed:
            self.delete(name)
        return doomed


class AliasStore(VectorStore):
    """A Qdrant server (or any client): versions are collections, the alias a Qdrant alias."""

    def __init__(self, client: QdrantClient, payload_indexes: bool = True):
        self.client = client
        self.payload_indexes = payload_indexes

    def active(self, alias: str) -> str | None:
        for description in self.client.get_aliases().aliases:
            if description.alias_name == alias:
                return description.collection_name
        return None

    def versions(self, alias: str) -> list[str]:
        names = [c.name for c in self.client.get_collections().collections]
        found = [n for n in names if version_number(alias, n) is not None]
        return sorted(found, key=lambda n: version_number(alias, n) or 0)

    def create(
        self, name: str, dimension: int, options: dict[str, Any], metadata: dict[str, Any]
    ) -> QdrantClient:
        create_collection(self.client, name, dimension, options, metadata, self.payload_indexes)
        return self.client

    def finish(self, name: str) -> None:
        return None

    def publish(self, alias: str, name: str) -> None:
        operations: list[models.AliasOperations] = []
        if self.active(alias) is not None:
            operations.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=name, alias_name=alias)
            )
        )
        self.client.update_collection_aliases(change_aliases_operations=operations)

    def unpublish(self, alias: str) -> None:
        if self.active(alias) is not None:
            self.client.update_collection_aliases(
                change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
                ]
            )

    def delete(self, name: str) -> None:
        self.client.delete_collection(name)

    def reader(self, name: str) -> QdrantClient:
        return self.client

    def searchable(self, alias: str) -> tuple[QdrantClient, str]:
        return self.client, alias

    def close(self) -> None:
        self.client.close()


class EmbeddedStore(VectorStore):
    """Embedded Qdrant: one storage folder per version, the alias a pointer file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._writers: dict[str, QdrantClient] = {}
        self._readers: dict[str, QdrantClient] = {}
        self._pointer_seen: dict[str, tuple[tuple[int, int, int], str | None]] = {}

    def pointer_path(self, alias: str) -> Path:
        return self.root / f"{alias}.json"

    def read_pointer(self, alias: str) -> dict[str, Any] | None:
        try:
            pointer: dict[str, Any] = json.loads(self.pointer_path(alias).read_text())
        except FileNotFoundError:
            return None
        return pointer

    def active(self, alias: str) -> str | None:
        pointer = self.read_pointer(alias)
        if pointer is None or not (self.root / pointer["collection"]).is_dir():
            return None
        return str(pointer["collection"])

    def versions(self, alias: str) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and version_number(alias, p.name) is not None
        ]
        return sorted(found, key=lambda n: version_number(alias, n) or 0)

    def create(
        self, name: str, dimension: int, options: dict[str, Any], metadata: dict[str, Any]
    ) -> QdrantClient:
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # one thread creates the collection, another upserts: never both at once
        client = QdrantClient(path=str(folder), force_disable_check_same_thread=True)
        self._writers[name] = client
        # shards, replicas and quantization mean nothing to embedded Qdrant (it ignores them)
        create_collection(client, name, dimension, {}, metadata, payload_indexes=False)
        return client

    def finish(self, name: str) -> None:
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.close()

    def publish(self, alias: str, name: str) -> None:
        if name in self._writers:
            raise RuntimeError(f"{name} is still open for writing; call finish() first")
        pointer = {
            "alias": alias,
            "collection": name,
            "publishedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        atomic_write(self.pointer_path(alias), json.dumps(pointer, indent=2) + "\n")

    def unpublish(self, alias: str) -> None:
        self.pointer_path(alias).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        for clients in (self._writers, self._readers):
            client = clients.pop(name, None)
            if client is not None:
                client.close()
        shutil.rmtree(self.root / name, ignore_errors=True)

    def reader(self, name: str) -> QdrantClient:
        """Open a published version in place. Only the index Job does this (it takes the lock)."""
        if name not in self._readers:
            self._readers[name] = _open_local(self.root / name)
        return self._readers[name]

    def searchable(self, alias: str) -> tuple[QdrantClient, str]:
        """The current version, read from a private copy; one stat() per call to notice moves."""
        path = self.pointer_path(alias)
        for attempt in range(3):
            try:
                stat = path.stat()
            except FileNotFoundError as exc:
                raise StoreUnavailable(
                    f"knowledge base {alias!r} has no index yet (no {path})"
                ) from exc
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            seen = self._pointer_seen.get(alias)
            name = seen[1] if seen and seen[0] == key else None
            if name is None:
                pointer = self.read_pointer(alias)
                name = str(pointer["collection"]) if pointer else None
                self._pointer_seen[alias] = (key, name)
            if name is None:
                continue
            try:
                return _snapshot(self.root / name), name
            except FileNotFoundError:  # pruned while we looked: read the pointer again
                self._pointer_seen.pop(alias, None)
                if attempt == 2:
                    raise
        raise StoreUnavailable(f"knowledge base {alias!r}: cannot read {path}")

    def close(self) -> None:
        for name in list(self._writers):
            self.finish(name)
        for client in self._readers.values():
            client.close()
        self._readers.clear()


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; readers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _open_local(folder: Path, wait_seconds: float = 30.0) -> QdrantClient:
    """Open an embedded storage folder, waiting a while if another client holds its lock."""
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"no embedded Qdrant storage at {folder}")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return QdrantClient(path=str(folder))
        except RuntimeError as exc:
            if "already accessed" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class _Snapshot:
    """A private copy of a published version folder, opened with embedded Qdrant."""

    def __init__(self, folder: Path):
        self.copy = Path(tempfile.mkdtemp(prefix=f"tailor-{folder.name}-"))
        try:
            shutil.copytree(folder, self.copy, dirs_exist_ok=True, ignore=_ignore_lock)
            # read-only from here on, so any thread of the process may query it
            self.client = QdrantClient(path=str(self.copy), force_disable_check_same_thread=True)
        except BaseException:
            shutil.rmtree(self.copy, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _remove_snapshot, self.client, self.copy)

    def close(self) -> None:
        self._finalizer()


def _ignore_lock(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == ".lock"]


def _remove_snapshot(client: QdrantClient, copy: Path) -> None:
    try:
        client.close()
    finally:
        shutil.rmtree(copy, ignore_errors=True)


_snapshots: OrderedDict[tuple[str, int, int], _Snapshot] = OrderedDict()
_snapshots_lock = threading.Lock()


def _snapshot(folder: Path) -> QdrantClient:
    """The shared private copy of a published version folder, made on first use."""
    meta = (folder / "meta.json").stat()
    key = (str(folder.resolve()), meta.st_ino, meta.st_mtime_ns)
    with _snapshots_lock:
        snapshot = _snapshots.get(key)
        if snapshot is None:
            started = time.monotonic()
            snapshot = _Snapshot(folder)
            log.info("opened %s in %.2fs", folder, time.monotonic() - started)
            _snapshots[key] = snapshot
            while len(_snapshots) > SNAPSHOT_CACHE_SIZE:
                _snapshots.popitem(last=False)[1].close()
        _snapshots.move_to_end(key)
        return snapshot.client


def open_store(config: RetrieverConfig, paths: Paths, timeout_seconds: int = 10) -> VectorStore:
    """The store a RetrieverConfig names: a Qdrant server at ``qdrant.url``, else embedded."""
    if config.qdrant.url:
        api_key = None
        if config.qdrant.api_key_secret_ref is not None:
            api_key = read_secret(config.qdrant.api_key_secret_ref, paths)
        client = QdrantClient(
            url=config.qdrant.url,
            api_key=api_key,
            timeout=timeout_seconds,
            check_compatibility=False,  # no request at construction time
        )
        return AliasStore(client)
    return EmbeddedStore(embedded_root(config, paths))


def embedded_root(config: RetrieverConfig, paths: Paths) -> Path:
    """Where an embedded store lives: ``config.path``, else ``<artifacts>/qdrant``."""
    return Path(config.path) if config.path else Path(paths.artifacts) / "qdrant"


def scroll_all(
    client: QdrantClient,
    collection: str,
    with_payload: bool | list[str] = True,
    with_vectors: bool | list[str] = False,
    page: int = 1024,
) -> Iterator[models.Record]:
    """Every point of a collection, page by page."""
    offset: models.ExtendedPointId | None = None
    while True:
        points, offset = client.scroll(
            collection,
            limit=page,
            offset=offset,
            with_payload=with_payload,
            with_vectors=with_vectors,
        )
        yield from points
        if offset is None:
            return
