"""Qdrant access for knowledge bases: versioned collections behind an alias, server or embedded.

A knowledge base lives in collections named ``<alias>-v<N>``; readers query the alias, and a
build publishes a new version by moving the alias to it in one step, only once it is
complete. Two stores implement that, behind one interface (:class:`VectorStore` for the
versions, :class:`Collection` for one version), so that the index workload and every reader
run the same code for dense, sparse and hybrid search whichever store holds the index:

- :class:`AliasStore`, a Qdrant server through qdrant-client: the alias is a real Qdrant
  alias, moved with one ``update_collection_aliases`` call holding the delete and the create,
  so queries see the old version or the new one, never neither.
- :class:`EdgeStore`, Qdrant Edge (``qdrant-edge-py``): the Qdrant engine itself (HNSW,
  payload indexes, sparse vectors with the IDF modifier, fusion) running in the process, on
  a folder. An Edge shard owns its folder: it locks it while open and writes to it even when
  only queried, so a serving process and an index Job writing the next version could not
  share one. Each version therefore gets its own folder ``<root>/<alias>-v<N>/``, written by
  the index Job alone and never changed once published, and the alias is a small pointer
  file ``<root>/<alias>.json`` replaced atomically (``os.replace``). Readers copy the
  published folder to a private temporary folder and open the copy: they never take the
  lock on the shared folder, they work on a read-only mount, and they switch to a new version
  when the pointer file changes. A version folder is also a snapshot: copied anywhere (or
  tarred), :meth:`EdgeStore.restore` publishes it again.

Each point has a dense vector ``dense`` (cosine) and a sparse vector ``bm25``: Qdrant's own
BM25 (:class:`Bm25`: words, stop words removed and stemmed for the knowledge base's language)
with Qdrant's IDF modifier supplying the inverse document frequency at query time.
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
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import qdrant_edge as edge
from qdrant_client import QdrantClient, models

from tailor.api.knowledgebase import QdrantStore
from tailor.api.workloads import Paths, RetrieverConfig
from tailor.workloads.io.sources import read_secret

log = logging.getLogger("tailor.workloads.knowledge.vectorstore")

DENSE = "dense"
SPARSE = "bm25"
RRF_K = 60
"""Reciprocal rank fusion's k (the value of the RRF paper, and of most hybrid engines)."""
PAYLOAD_INDEXES = ("hash", "document_id", "source")
TOP_LEVEL_FIELDS = frozenset({"document_id", "source", "title", "position", "hash"})
SNAPSHOT_CACHE_SIZE = 4
SHARD = "shard"
"""The Edge shard's folder inside a version folder."""
META = "tailor.json"
"""A version folder's metadata, written when the version is complete."""


class StoreUnavailable(Exception):
    """The vector store cannot be reached, or holds no index under the alias."""


def point_id(key: str) -> str:
    """A Qdrant point id (a UUID) derived from ``key``: stable across runs."""
    return str(uuid.UUID(hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]))


# --- the data both stores read and write ----------------------------------------------------


@dataclass(frozen=True)
class Sparse:
    """A sparse vector: term ids and weights."""

    indices: list[int]
    values: list[float]


@dataclass
class PointData:
    """One chunk as stored: id, dense vector, BM25 vector, payload."""

    id: str
    dense: list[float]
    sparse: Sparse
    payload: dict[str, Any]


@dataclass(frozen=True)
class Search:
    """One query. With ``sparse`` it is hybrid: dense and BM25 candidates fused by RRF."""

    dense: list[float]
    limit: int
    sparse: Sparse | None = None
    candidates: int = 0
    """Candidates each side of a hybrid query fetches (at least ``limit``)."""
    threshold: float | None = None
    """Lowest cosine similarity (of the dense candidates, in a hybrid query)."""
    filters: Mapping[str, Any] | None = None
    """``{field: value}``; a list value matches any of its items (see :func:`conditions`)."""
    sparse_only: bool = False


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


TIE_DECIMALS = 6
"""Scores equal to this many decimals are a tie (float noise between embedding batches)."""


def ranked(points: Sequence[Any]) -> list[Hit]:
    """A store's scored points as hits, best first, ties broken by point id: the store's
    own order among equal scores varies between runs, and so would the first answer."""
    hits = [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points]
    return sorted(hits, key=lambda h: (-round(h.score, TIE_DECIMALS), h.id))


def conditions(filters: Mapping[str, Any] | None) -> list[tuple[str, list[Any]]]:
    """``(payload key, accepted values)`` pairs of a ``{field: value}`` filter.

    ``document_id``, ``source``, ``title``, ``position`` and ``hash`` are chunk fields; any
    other key is looked up in the chunk's metadata (``metadata.<key>``).
    """
    pairs = []
    for name, value in (filters or {}).items():
        key = (
            name if name in TOP_LEVEL_FIELDS or name.startswith("metadata.") else f"metadata.{name}"
        )
        values = list(value) if isinstance(value, list | tuple | set) else [value]
        pairs.append((key, values))
    return pairs


class Bm25:
    """Qdrant's BM25 (from Qdrant Edge): the same tokenizer, stop words and stemmer as a
    Qdrant server's built-in ``qdrant/bm25`` model, computed here for both stores.

    ``average_words`` is the corpus' average chunk length in words (BM25's length norm).
    """

    def __init__(self, language: str = "english", average_words: float = 256.0):
        self.language = language
        self.average_words = average_words
        self._model = edge.Bm25(edge.Bm25Config(language=language, avg_len=average_words))

    def document(self, text: str) -> Sparse:
        vector = self._model.embed_document(text)
        return Sparse(list(vector.indices), list(vector.values))

    def query(self, text: str) -> Sparse:
        vector = self._model.embed_query(text)
        return Sparse(list(vector.indices), list(vector.values))


_bm25: dict[str, Bm25] = {}


def query_bm25(language: str) -> Bm25:
    """A shared BM25 for queries (their vectors do not depend on the average length)."""
    if language not in _bm25:
        _bm25[language] = Bm25(language)
    return _bm25[language]


def average_words(texts: Sequence[str]) -> float:
    """The average length of ``texts`` in words, BM25's length normalisation constant."""
    return max(1.0, sum(len(t.split()) for t in texts) / max(len(texts), 1))


class Collection(ABC):
    """One version of a knowledge base (or, to a reader, the alias)."""

    name: str

    @abstractmethod
    def upsert(self, points: Sequence[PointData]) -> None: ...

    @abstractmethod
    def count(self, filters: Mapping[str, Any] | None = None) -> int: ...

    @abstractmethod
    def scroll(self, fields: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(id, payload)`` of every point; ``fields`` limits the payload (None: all)."""

    @abstractmethod
    def dense_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        """The dense vectors of the given point ids that exist."""

    @abstractmethod
    def query(self, searches: Sequence[Search]) -> list[list[Hit]]:
        """The hits of each search, best first, in one batch."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_metadata(self, values: Mapping[str, Any]) -> None: ...


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
        self, name: str, dimension: int, options: QdrantStore, metadata: dict[str, Any]
    ) -> Collection:
        """Create collection ``name``; returns it, to write."""

    @abstractmethod
    def finish(self, name: str) -> None:
        """Writing ``name`` is done (and was successful): index it and close it."""

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
    def reader(self, name: str) -> Collection:
        """A published version, to read."""

    def version_metadata(self, name: str) -> dict[str, Any]:
        """The metadata a finished version was written with."""
        return self.reader(name).metadata()

    @abstractmethod
    def searchable(self, alias: str) -> Collection:
        """What the alias points at now, to query; follows the alias when it moves."""

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


def version_name(alias: str, number: int) -> str:
    return f"{alias}-v{number}"


def version_number(alias: str, name: str) -> int | None:
    """N for a collection named ``<alias>-v<N>``, else None."""
    match = re.fullmatch(re.escape(alias) + r"-v(\d+)", name)
    return int(match.group(1)) if match else None


# --- a Qdrant server ------------------------------------------------------------------------


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


def oversampling(quantization: str) -> float | None:
    """How many more candidates a quantized search rescores (None: not quantized)."""
    return {"scalar": 1.5, "binary": 3.0}.get(quantization)


class ServerCollection(Collection):
    """A collection (or alias) of a Qdrant server."""

    def __init__(self, client: QdrantClient, name: str, quantization: str = "none"):
        self.client = client
        self.name = name
        factor = oversampling(quantization)
        self._params = (
            models.SearchParams(
                quantization=models.QuantizationSearchParams(rescore=True, oversampling=factor)
            )
            if factor
            else None
        )

    def upsert(self, points: Sequence[PointData]) -> None:
        self.client.upsert(
            self.name,
            [
                models.PointStruct(
                    id=p.id,
                    vector={DENSE: p.dense, SPARSE: _server_sparse(p.sparse)},
                    payload=p.payload,
                )
                for p in points
            ],
            wait=True,
        )

    def count(self, filters: Mapping[str, Any] | None = None) -> int:
        return self.client.count(self.name, count_filter=_server_filter(filters), exact=True).count

    def scroll(self, fields: Sequence[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        offset: models.ExtendedPointId | None = None
        while True:
            points, offset = self.client.scroll(
                self.name,
                limit=1024,
                offset=offset,
                with_payload=list(fields) if fields is not None else True,
            )
            for point in points:
                yield str(point.id), dict(point.payload or {})
            if offset is None:
                return

    def dense_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for record in self.client.retrieve(self.name, list(ids), with_vectors=[DENSE]):
            vector = record.vector.get(DENSE) if isinstance(record.vector, dict) else None
            if isinstance(vector, list):
                found[str(record.id)] = [float(x) for x in vector]  # type: ignore[arg-type]
        return found

    def query(self, searches: Sequence[Search]) -> list[list[Hit]]:
        requests = [self._request(s) for s in searches]
        responses = self.client.query_batch_points(self.name, requests=requests)
        return [ranked(response.points) for response in responses]

    def _request(self, search: Search) -> models.QueryRequest:
        condition = _server_filter(search.filters)
        if search.sparse_only and search.sparse is not None:
            return models.QueryRequest(
                query=_server_sparse(search.sparse),
                using=SPARSE,
                filter=condition,
                limit=search.limit,
                with_payload=True,
            )
        if search.sparse is None:
            return models.QueryRequest(
                query=search.dense,
                using=DENSE,
                filter=condition,
                limit=search.limit,
                score_threshold=search.threshold,
                params=self._params,
                with_payload=True,
            )
        candidates = max(search.candidates, search.limit)
        return models.QueryRequest(
            prefetch=[
                models.Prefetch(
                    query=search.dense,
                    using=DENSE,
                    filter=condition,
                    limit=candidates,
                    score_threshold=search.threshold,
                    params=self._params,
                ),
                models.Prefetch(
                    query=_server_sparse(search.sparse),
                    using=SPARSE,
                    filter=condition,
                    limit=candidates,
                ),
            ],
            query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)),
            limit=search.limit,
            with_payload=True,
        )

    def metadata(self) -> dict[str, Any]:
        return dict(self.client.get_collection(self.name).config.metadata or {})

    def set_metadata(self, values: Mapping[str, Any]) -> None:
        try:
            self.client.update_collection(self.name, metadata=dict(values))
        except Exception as exc:  # a server without collection metadata
            log.warning("cannot store collection metadata (%s): every refresh makes a version", exc)


def _server_sparse(sparse: Sparse) -> models.SparseVector:
    return models.SparseVector(indices=sparse.indices, values=sparse.values)


def _server_filter(filters: Mapping[str, Any] | None) -> models.Filter | None:
    must: list[models.Condition] = []
    for key, values in conditions(filters):
        match: models.Match = (
            models.MatchValue(value=values[0]) if len(values) == 1 else models.MatchAny(any=values)
        )
        must.append(models.FieldCondition(key=key, match=match))
    return models.Filter(must=must) if must else None


class AliasStore(VectorStore):
    """A Qdrant server (or any client): versions are collections, the alias a Qdrant alias."""

    def __init__(self, client: QdrantClient, payload_indexes: bool = True):
        self.client = client
        self.payload_indexes = payload_indexes
        self._quantization: dict[str, str] = {}

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
        self, name: str, dimension: int, options: QdrantStore, metadata: dict[str, Any]
    ) -> Collection:
        self.client.create_collection(
            name,
            vectors_config={
                DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)
            },
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            metadata=metadata,
            **collection_options(options),
        )
        for key in PAYLOAD_INDEXES if self.payload_indexes else ():
            self.client.create_payload_index(name, key, models.PayloadSchemaType.KEYWORD)
        return ServerCollection(self.client, name, options.quantization)

    def finish(self, name: str) -> None:
        return None  # the server indexes in the background

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

    def reader(self, name: str) -> Collection:
        return ServerCollection(self.client, name)

    def searchable(self, alias: str) -> Collection:
        return ServerCollection(self.client, alias, self._quantization.get(alias, "none"))

    def quantized(self, alias: str, quantization: str) -> AliasStore:
        """Queries of ``alias`` rescore quantized candidates (the collections are quantized)."""
        self._quantization[alias] = quantization
        return self

    def close(self) -> None:
        self.client.close()


# --- Qdrant Edge ----------------------------------------------------------------------------


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


def open_store(config: RetrieverConfig, paths: Paths, timeout_seconds: int = 10) -> VectorStore:
    """The store a RetrieverConfig names: a Qdrant server at ``qdrant.url``, else Qdrant Edge."""
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
        return AliasStore(client).quantized(config.alias, config.qdrant.quantization)
    return EdgeStore(embedded_root(config, paths))


def embedded_root(config: RetrieverConfig, paths: Paths) -> Path:
    """Where an embedded store lives: ``config.path``, else ``<artifacts>/qdrant``."""
    return Path(config.path) if config.path else Path(paths.artifacts) / "qdrant"
