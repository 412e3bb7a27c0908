"""Querying a knowledge base: the library that serving and RAFT use, and the embedding model.

``Retriever(config, paths).search("question")`` embeds the question with the knowledge
base's embedding model and returns the nearest chunks, optionally filtered on metadata, and
optionally fused with BM25 keyword matches (Qdrant's Query API: two prefetches, dense and
sparse, combined by reciprocal rank fusion), in a Qdrant server or in Qdrant Edge alike.
A Retriever is cheap to construct: the model is loaded once per process and shared
(:func:`load_embedder`), the Qdrant server client makes no request until the first search,
and a Qdrant Edge index is copied once per version and shared. It always queries the alias, so it follows a build that moves the alias; when the
store cannot be reached, or has no index yet, it raises :class:`RetrieverUnavailable`, which
serving catches to answer without context.

:class:`Embedder` is the sentence-transformers model with its tokenizer, used by the index
workload too: it embeds token ids the chunker already produced (no second tokenization),
and queries as text.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from qdrant_client.common.client_exceptions import QdrantException
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from sentence_transformers import SentenceTransformer

from tailor.api.knowledgebase import Embedding
from tailor.api.workloads import Paths, RetrieverConfig
from tailor.workloads.io.sources import model_path, read_secret
from tailor.workloads.knowledge.vectorstore import (
    Collection,
    Hit,
    Search,
    StoreUnavailable,
    VectorStore,
    open_store,
    query_bm25,
    version_name,
)

log = logging.getLogger("tailor.workloads.knowledge.retriever")

T = TypeVar("T")

HYBRID_CANDIDATES = 4
"""Each prefetch of a hybrid query fetches this many times top_k candidates."""


class RetrieverUnavailable(Exception):
    """The knowledge base cannot be queried now (store unreachable, no index yet)."""


@dataclass(frozen=True)
class RetrievedChunk:
    """One search result."""

    id: str
    text: str
    score: float
    source: str
    title: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    document_id: str = ""


class Embedder:
    """A sentence-transformers model and its tokenizer, producing normalised vectors."""

    def __init__(self, model: SentenceTransformer, key: str, location: str | Path):
        self.model = model
        self.key = key
        """Identifies the model (its location and dimension): vectors are reusable when equal."""
        self.location = location
        """Where it was loaded from (a folder, or a hub repo id)."""
        self.tokenizer = model.tokenizer
        dimension = model.get_embedding_dimension()
        if dimension is None:
            raise ValueError(f"{key}: the model does not report its embedding dimension")
        self.dimension: int = dimension
        self._prefix, self._suffix = _special_tokens(self.tokenizer)
        self._pad = self.tokenizer.pad_token_id or 0
        self._token_types = "token_type_ids" in self.tokenizer.model_input_names
        readable = model.max_seq_length or self.tokenizer.model_max_length
        self.max_tokens = readable - len(self._prefix) - len(self._suffix)
        """Tokens of text the model reads, without its special tokens."""
        self.lock = threading.Lock()

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        encoded = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        ids: list[list[int]] = encoded["input_ids"]
        return ids

    @torch.inference_mode()  # type: ignore[untyped-decorator]
    def embed_token_ids(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Normalised embeddings of already tokenized texts (one forward pass: batch them)."""
        rows = [self._prefix + list(ids[: self.max_tokens]) + self._suffix for ids in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
        features: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "modality": "text",
        }
        if self._token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        device = self.model.device
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
        output = self.model(features)["sentence_embedding"]
        normalised = torch.nn.functional.normalize(output.float(), p=2, dim=1)
        result: np.ndarray = normalised.cpu().numpy()
        return result

    def embed_queries(self, queries: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised embeddings of query texts, through sentence-transformers' encode."""
        with self.lock:
            vectors: np.ndarray = self.model.encode(
                list(queries),
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return vectors


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


_embedders: dict[tuple[str, str], Embedder] = {}
_embedders_lock = threading.Lock()


def load_embedder(embedding: Embedding, paths: Paths, device: str | None = None) -> Embedder:
    """The embedding model of a spec, loaded once per process and device."""
    location = model_path(embedding.model, paths)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_key = (str(location), device)
    with _embedders_lock:
        if cache_key in _embedders:
            return _embedders[cache_key]
        kwargs: dict[str, Any] = {"device": device}
        source = embedding.model.hub
        if source is not None:
            kwargs["revision"] = source.revision
            if source.token_secret_ref is not None:
                kwargs["token"] = read_secret(source.token_secret_ref, paths)
        model = SentenceTransformer(str(location), **kwargs)
        model.eval()
        name = embedding.model.builtin or (source.repo if source else str(location))
        revision = f"@{source.revision}" if source else ""
        key = f"{name}{revision}/{model.get_embedding_dimension()}"
        embedder = Embedder(model, key, location)
        _embedders[cache_key] = embedder
        return embedder


def load_embedder_folder(folder: Path, device: str | None = None) -> Embedder:
    """A model that spec.adaptation tuned and saved (see :mod:`.adaptation`), loaded once
    per process and device; its key is the one its vectors were indexed with."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_key = (str(folder), device)
    with _embedders_lock:
        if cache_key not in _embedders:
            status = json.loads((folder / "adaptation.json").read_text())
            model = SentenceTransformer(str(folder), device=device, local_files_only=True)
            model.eval()
            _embedders[cache_key] = Embedder(model, str(status["model"]), folder)
        return _embedders[cache_key]


class Retriever:
    """Search a knowledge base by meaning (and keywords, with ``retrieval.hybrid``)."""

    def __init__(
        self,
        config: RetrieverConfig,
        paths: Paths,
        timeout_seconds: int = 10,
        store: VectorStore | None = None,
    ):
        """``store`` overrides the store the config names (e.g. to share one client)."""
        self.config = config
        self.paths = paths
        self.alias = config.alias
        self._store = store or open_store(config, paths, timeout_seconds=timeout_seconds)
        self._tuned: dict[str, str | None] = {}
        """Each version's tuned model folder (a version's metadata never changes after its
        build), so a server is not asked again on every query."""
        self._embedder: Embedder | None = None
        self._bm25 = query_bm25(config.retrieval.language)
        self._versions: dict[int, Collection] = {}
        self._versions_lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.config.embedding, self.paths)
        return self._embedder

    def search(
        self,
        query: str,
        top_k: int | None = None,
        score_threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        version: int | None = None,
    ) -> list[RetrievedChunk]:
        """The chunks nearest to ``query``, best first."""
        return self.search_batch([query], top_k, score_threshold, filters, version)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        top_k: int | None = None,
        score_threshold: float | None = None,
        filters: Mapping[str, Any] | None = None,
        version: int | None = None,
    ) -> list[list[RetrievedChunk]]:
        """Results of many queries: one embedding pass and one store request for all.

        ``filters`` is ``{field: value}`` (a list value matches any of its items; see
        :func:`~tailor.workloads.knowledge.vectorstore.base.conditions`).
        ``score_threshold`` is a cosine similarity; in hybrid mode it applies to the dense
        candidates (fused scores are ranks, not similarities). ``version``: search version
        N of the index (``<alias>-v<N>``, e.g. a rollout's candidate) instead of the one
        the alias serves.
        """
        if not queries:
            return []
        limit = top_k or self.config.retrieval.top_k
        threshold = (
            score_threshold
            if score_threshold is not None
            else self.config.retrieval.score_threshold
        )
        collection = self._searchable() if version is None else self._version(version)
        vectors = self.embedder_of(collection).embed_queries(queries)
        hybrid = self.config.retrieval.hybrid
        searches = [
            Search(
                dense=vector.tolist(),
                limit=limit,
                sparse=self._bm25.query(query) if hybrid else None,
                candidates=limit * HYBRID_CANDIDATES,
                threshold=threshold,
                filters=filters,
            )
            for query, vector in zip(queries, vectors, strict=True)
        ]
        hits = self.query(searches, collection)
        return [[_chunk(hit) for hit in result] for result in hits]

    def embedder_of(self, collection: Collection) -> Embedder:
        """The model that embedded a version's vectors: the one spec.adaptation tuned, when
        the version names one, else the knowledge base's embedding model."""
        if self.config.embedders is None:
            return self.embedder
        if collection.name not in self._tuned:
            try:
                folder = collection.metadata().get("tailorEmbedder")
            except Exception as exc:  # server unreachable and the like: as for a query
                raise RetrieverUnavailable(f"cannot read the index's metadata: {exc}") from exc
            self._tuned[collection.name] = folder
        folder = self._tuned[collection.name]
        if not folder:
            return self.embedder
        try:
            return load_embedder_folder(Path(self.config.embedders) / str(folder))
        except OSError as exc:
            raise RetrieverUnavailable(
                f"knowledge base {self.alias!r}: its tuned embedding model {folder} cannot be "
                f"read ({exc})"
            ) from exc

    def query(
        self, searches: Sequence[Search], collection: Collection | None = None
    ) -> list[list[Hit]]:
        """Run searches on ``collection``, by default whatever the alias points at now."""
        return self._guarded(
            lambda: (collection or self._store.searchable(self.alias)).query(searches)
        )

    def _searchable(self) -> Collection:
        return self._guarded(lambda: self._store.searchable(self.alias))

    def _version(self, number: int) -> Collection:
        """Version ``number`` of the index, opened once (a version never changes after its
        build); a pruned or never built one is RetrieverUnavailable."""
        with self._versions_lock:
            if number not in self._versions:
                name = version_name(self.alias, number)
                if name not in self._guarded(lambda: self._store.versions(self.alias)):
                    raise RetrieverUnavailable(
                        f"knowledge base {self.alias!r} has no version {number} (kept: "
                        f"{', '.join(self._store.versions(self.alias)) or 'none'})"
                    )
                self._versions[number] = self._guarded(lambda: self._store.reader(name))
            return self._versions[number]

    def _guarded(self, call: Callable[[], T]) -> T:
        """``call()``, with the store's failures turned into RetrieverUnavailable."""
        try:
            return call()
        except StoreUnavailable as exc:
            raise RetrieverUnavailable(str(exc)) from exc
        except UnexpectedResponse as exc:
            if exc.status_code == 404:
                raise RetrieverUnavailable(
                    f"knowledge base {self.alias!r} has no index yet ({exc.reason_phrase})"
                ) from exc
            raise RetrieverUnavailable(f"Qdrant answered {exc.status_code}: {exc}") from exc
        except (ResponseHandlingException, QdrantException, OSError) as exc:
            raise RetrieverUnavailable(f"Qdrant is unreachable: {exc}") from exc
        except ValueError as exc:  # "Collection ... not found"
            raise RetrieverUnavailable(f"knowledge base {self.alias!r}: {exc}") from exc

    def close(self) -> None:
        self._store.close()


def _chunk(hit: Hit) -> RetrievedChunk:
    payload = hit.payload
    return RetrievedChunk(
        id=hit.id,
        text=str(payload.get("text", "")),
        score=hit.score,
        source=str(payload.get("source", "")),
        title=payload.get("title"),
        metadata=dict(payload.get("metadata") or {}),
        document_id=str(payload.get("document_id", "")),
    )
