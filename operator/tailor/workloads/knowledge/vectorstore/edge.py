"""Qdrant Edge (``qdrant-edge-py``) as the vector store: the Qdrant engine itself (HNSW,
payload indexes, sparse vectors with the IDF modifier, fusion) running in the process, on a
folder.

An Edge shard owns its folder: it locks it while open and writes to it even when only
queried, so a serving process and an index Job writing the next version could not share
one. Each version therefore gets its own folder ``<root>/<alias>-v<N>/``, written by the
index Job alone and never changed once published, and the alias is a small pointer file
``<root>/<alias>.json`` replaced atomically (``os.replace``). Readers copy the published
folder to a private temporary folder and open the copy: they never take the lock on the
shared folder, they work on a read-only mount, and they switch to a new version when the
pointer file changes. A version folder is also a snapshot: copied anywhere (or tarred),
:meth:`EdgeStore.restore` publishes it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import qdrant_edge as edge

from tailor.api.knowledgebase import QdrantStore
from tailor.workloads.knowledge.vectorstore.base import (
    DENSE,
    PAYLOAD_INDEXES,
    RRF_K,
    SPARSE,
    Collection,
    Hit,
    PointData,
    Search,
    Sparse,
    StoreUnavailable,
    VectorStore,
    conditions,
    oversampling,
    ranked,
    version_number,
)

log = logging.getLogger("tailor.workloads.knowledge.vectorstore.edge")

SNAPSHOT_CACHE_SIZE = 4
SHARD = "shard"
"""The Edge shard's folder inside a version folder."""
META = "tailor.json"
"""A version folder's metadata, written when the version is complete."""


def edge_config(dimension: int, quantization: str = "none") -> edge.EdgeConfig:
    """A knowledge-base shard: ``dense`` cosine vectors, ``bm25`` sparse vectors with IDF."""
    quantized: Any = None
    if quantization == "scalar":
        quantized = edge.ScalarQuantizationConfig(edge.ScalarType.Int8, always_ram=True)
    elif quantization == "binary":
        quantized = edge.BinaryQuantizationConfig(always_ram=True)
    return edge.EdgeConfig(
        vectors={DENSE: edge.EdgeVectorParams(size=dimension, distance=edge.Distance.Cosine)},
        sparse_vectors={SPARSE: edge.EdgeSparseVectorParams(modifier=edge.Modifier.Idf)},
        quantization_config=quantized,
    )


class EdgeCollection(Collection):
    """A version held in a Qdrant Edge shard."""

    def __init__(
        self, shard: edge.EdgeShard, name: str, folder: Path, metadata: dict[str, Any]
    ) -> None:
        self.shard = shard
        self.name = name
        self.folder = folder
        self._metadata = dict(metadata)
        factor = oversampling(str(metadata.get("tailorQuantization", "none")))
        self._params = (
            edge.SearchParams(
                quantization=edge.QuantizationSearchParams(rescore=True, oversampling=factor)
            )
            if factor
            else None
        )

    def upsert(self, points: Sequence[PointData]) -> None:
        self.shard.update(
            edge.UpdateOperation.upsert_points(
                [
                    edge.Point(
                        p.id,
                        {DENSE: p.dense, SPARSE: _edge_sparse(p.sparse)},
                        p.payload,
                    )
                    for p in points
                ]
            )
        )

    def count(self, filters: Mapping[str, Any] | None = None) -> int:
        return int(self.shard.count(edge.CountRequest(exact=True, filter=_edge_filter(filters))))

    def scroll(self, fields: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        offset: Any = None
        while True:
            records, offset = self.shard.scroll(
                edge.ScrollRequest(
                    offset=offset,
                    limit=1024,
                    with_payload=list(fields) if fields is not None else True,
                    with_vector=False,
                )
            )
            for record in records:
                yield str(record.id), dict(record.payload or {})
            if offset is None:
                return

    def dense_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for record in self.shard.retrieve(list(ids), with_payload=False, with_vector=[DENSE]):
            vectors = record.vector
            vector = vectors.get(DENSE) if isinstance(vectors, dict) else None
            if isinstance(vector, list):
                found[str(record.id)] = [float(x) for x in vector]  # type: ignore[arg-type]
        return found

    def query(self, searches: Sequence[Search]) -> list[list[Hit]]:
        requests = [self._request(s) for s in searches]
        try:
            if len(requests) == 1:
                results = [self.shard.query(requests[0])]
            else:
                results = self.shard.query_batch(edge.QueryBatchRequest(requests))
        except Exception as exc:  # Qdrant Edge raises plain Exceptions ("Vector dimension ...")
            raise StoreUnavailable(f"Qdrant Edge cannot query {self.name}: {exc}") from exc
        return [ranked(points) for points in results]

    def _request(self, search: Search) -> edge.QueryRequest:
        condition = _edge_filter(search.filters)
        if search.sparse_only and search.sparse is not None:
            return edge.QueryRequest(
                limit=search.limit,
                query=edge.Query.Nearest(_edge_sparse(search.sparse), using=SPARSE),
                filter=condition,
                with_payload=True,
            )
        dense = edge.Query.Nearest(search.dense, using=DENSE)
        if search.sparse is None:
            return edge.QueryRequest(
                limit=search.limit,
                query=dense,
                filter=condition,
                score_threshold=search.threshold,
                params=self._params,
                with_payload=True,
            )
        candidates = max(search.candidates, search.limit)
        return edge.QueryRequest(
            limit=search.limit,
            prefetches=[
                edge.Prefetch(
                    candidates,
                    query=dense,
                    filter=condition,
                    score_threshold=search.threshold,
                    params=self._params,
                ),
                edge.Prefetch(
                    candidates,
                    query=edge.Query.Nearest(_edge_sparse(search.sparse), using=SPARSE),
                    filter=condition,
                ),
            ],
            query=edge.Fusion.Rrf(k=RRF_K),  # type: ignore[arg-type]
            with_payload=True,
        )

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def set_metadata(self, values: Mapping[str, Any]) -> None:
        self._metadata |= dict(values)


def _edge_sparse(sparse: Sparse) -> edge.SparseVector:
    return edge.SparseVector(indices=sparse.indices, values=sparse.values)


def _edge_filter(filters: Mapping[str, Any] | None) -> edge.Filter | None:
    must: list[Any] = []
    for key, values in conditions(filters):
        match: Any = edge.MatchValue(values[0]) if len(values) == 1 else edge.MatchAny(values)
        must.append(edge.FieldCondition(key, match=match))
    return edge.Filter(must=must) if must else None


class EdgeStore(VectorStore):
    """Qdrant Edge: one shard folder per version, the alias a pointer file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._writers: dict[str, EdgeCollection] = {}
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
        if pointer is None or not (self.root / pointer["collection"] / META).is_file():
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
        self, name: str, dimension: int, options: QdrantStore, metadata: dict[str, Any]
    ) -> Collection:
        folder = self.root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # shards and replicas mean nothing in one process; quantization does
        shard = edge.EdgeShard.create(
            str(folder / SHARD), edge_config(dimension, options.quantization)
        )
        for key in PAYLOAD_INDEXES:
            shard.update(
                edge.UpdateOperation.create_field_index(key, edge.PayloadSchemaType.Keyword)
            )
        collection = EdgeCollection(
            shard, name, folder, metadata | {"tailorQuantization": options.quantization}
        )
        self._writers[name] = collection
        return collection

    def finish(self, name: str) -> None:
        """Build the HNSW graph, flush and close the shard, then mark the version complete."""
        writer = self._writers.pop(name, None)
        if writer is None:
            return
        started = time.monotonic()
        writer.shard.optimize()
        writer.shard.flush()
        writer.shard.close()
        log.info("optimized and closed %s in %.1fs", name, time.monotonic() - started)
        atomic_write(writer.folder / META, json.dumps(writer.metadata(), indent=2) + "\n")

    def publish(self, alias: str, name: str) -> None:
        if name in self._writers:
            raise RuntimeError(f"{name} is still open for writing; call finish() first")
        if not (self.root / name / META).is_file():
            raise RuntimeError(f"{name} is not a complete version (no {META})")
        pointer = {
            "alias": alias,
            "collection": name,
            "publishedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        atomic_write(self.pointer_path(alias), json.dumps(pointer, indent=2) + "\n")

    def unpublish(self, alias: str) -> None:
        self.pointer_path(alias).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        writer = self._writers.pop(name, None)
        if writer is not None:
            writer.shard.close()
        shutil.rmtree(self.root / name, ignore_errors=True)

    def version_metadata(self, name: str) -> dict[str, Any]:
        metadata: dict[str, Any] = json.loads((self.root / name / META).read_text())
        return metadata

    def reader(self, name: str) -> Collection:
        """A published version, from a private copy (opening it in place would change it)."""
        return _snapshot(self.root / name, name)

    def searchable(self, alias: str) -> Collection:
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
            if (self.root / name / "meta.json").is_file() and not (
                self.root / name / META
            ).exists():
                raise StoreUnavailable(
                    f"knowledge base {alias!r}: {name} was written by qdrant-client's local mode "
                    "(Tailor before Qdrant Edge); rebuild it (a refresh or any spec change)"
                )
            try:
                return _snapshot(self.root / name, name)
            except FileNotFoundError:  # pruned while we looked: read the pointer again
                self._pointer_seen.pop(alias, None)
                if attempt == 2:
                    raise
        raise StoreUnavailable(f"knowledge base {alias!r}: cannot read {path}")

    def restore(self, alias: str, folder: str | Path) -> str:
        """Publish a copy of a version folder (a snapshot) as the next version of ``alias``."""
        source = Path(folder)
        if not (source / META).is_file() or not (source / SHARD).is_dir():
            raise ValueError(f"{source} is not a knowledge-base version (no {META} or {SHARD}/)")
        name = self.next_version(alias)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        staging.chmod(0o755)  # readers may run as another user
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=_ignore_lock)
        os.replace(staging, self.root / name)
        self.publish(alias, name)
        return name

    def close(self) -> None:
        for name in list(self._writers):
            self.delete(name)  # never finished: not a version


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


class _Snapshot:
    """A private copy of a published version folder, opened with Qdrant Edge."""

    def __init__(self, folder: Path, name: str):
        metadata = json.loads((folder / META).read_text())
        self.copy = Path(tempfile.mkdtemp(prefix=f"tailor-{folder.name}-"))
        try:
            shutil.copytree(folder, self.copy, dirs_exist_ok=True, ignore=_ignore_lock)
            shard = edge.EdgeShard.load(str(self.copy / SHARD))
        except BaseException as exc:
            shutil.rmtree(self.copy, ignore_errors=True)
            if type(exc) is Exception:  # Qdrant Edge's errors
                raise StoreUnavailable(f"Qdrant Edge cannot open {folder}: {exc}") from exc
            raise
        self.collection = EdgeCollection(shard, name, folder, metadata)
        self._finalizer = weakref.finalize(self, _remove_snapshot, shard, self.copy)

    def close(self) -> None:
        self._finalizer()


def _ignore_lock(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == ".lock"]


def _remove_snapshot(shard: edge.EdgeShard, copy: Path) -> None:
    try:
        shard.close()
    finally:
        shutil.rmtree(copy, ignore_errors=True)


_snapshots: OrderedDict[tuple[str, int, int], _Snapshot] = OrderedDict()
_snapshots_lock = threading.Lock()


def _snapshot(folder: Path, name: str) -> EdgeCollection:
    """The shared private copy of a published version folder, made on first use."""
    try:
        meta = (folder / META).stat()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no complete knowledge-base version at {folder}") from exc
    key = (str(folder.resolve()), meta.st_ino, meta.st_mtime_ns)
    with _snapshots_lock:
        snapshot = _snapshots.get(key)
        if snapshot is None:
            started = time.monotonic()
            snapshot = _Snapshot(folder, name)
            log.info("opened %s in %.2fs", folder, time.monotonic() - started)
            _snapshots[key] = snapshot
            while len(_snapshots) > SNAPSHOT_CACHE_SIZE:
                _snapshots.popitem(last=False)[1].close()
        _snapshots.move_to_end(key)
        return snapshot.collection
