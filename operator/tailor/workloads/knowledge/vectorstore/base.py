"""What both vector stores share: the data they read and write (:class:`PointData`,
:class:`Search`, :class:`Hit`), the interface they implement (:class:`VectorStore` for the
versions of a knowledge base, :class:`Collection` for one version), the ranking and filters
every query uses, and Qdrant's BM25 (:class:`Bm25`: words, stop words removed and stemmed
for the knowledge base's language), computed here for both stores."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import qdrant_edge as edge

from tailor.api.knowledgebase import QdrantStore

log = logging.getLogger("tailor.workloads.knowledge.vectorstore.base")

DENSE = "dense"
SPARSE = "bm25"
RRF_K = 60
"""Reciprocal rank fusion's k (the value of the RRF paper, and of most hybrid engines)."""
PAYLOAD_INDEXES = ("hash", "document_id", "source")
TOP_LEVEL_FIELDS = frozenset({"document_id", "source", "title", "position", "hash"})


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


def oversampling(quantization: str) -> float | None:
    """How many more candidates a quantized search rescores (None: not quantized)."""
    return {"scalar": 1.5, "binary": 3.0}.get(quantization)
