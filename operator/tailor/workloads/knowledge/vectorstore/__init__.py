"""Qdrant access for knowledge bases: versioned collections behind an alias, server or embedded.

A knowledge base lives in collections named ``<alias>-v<N>``; readers query the alias, and a
build publishes a new version by moving the alias to it in one step, only once it is
complete. Two stores implement that, behind one interface (:class:`VectorStore` for the
versions, :class:`Collection` for one version, in :mod:`.base`), so that the index workload
and every reader run the same code for dense, sparse and hybrid search whichever store holds
the index:

- :class:`AliasStore` (:mod:`.server`), a Qdrant server through qdrant-client: the alias is a
  real Qdrant alias, moved in one step.
- :class:`EdgeStore` (:mod:`.edge`), Qdrant Edge (``qdrant-edge-py``): the Qdrant engine
  itself running in the process, one folder per version, the alias a pointer file; readers
  open private copies. A version folder is also a snapshot (:meth:`EdgeStore.restore`).

Each point has a dense vector ``dense`` (cosine) and a sparse vector ``bm25``: Qdrant's own
BM25 (:class:`Bm25`) with Qdrant's IDF modifier supplying the inverse document frequency at
query time.

Callers import the interface, the two stores and :func:`open_store` from here.
"""

from __future__ import annotations

from pathlib import Path

from qdrant_client import QdrantClient

from tailor.api.workloads import Paths, RetrieverConfig
from tailor.workloads.io.sources import read_secret
from tailor.workloads.knowledge.vectorstore.base import (
    Bm25,
    Collection,
    Hit,
    PointData,
    Search,
    Sparse,
    StoreUnavailable,
    VectorStore,
    average_words,
    point_id,
    query_bm25,
    version_name,
)
from tailor.workloads.knowledge.vectorstore.edge import EdgeStore
from tailor.workloads.knowledge.vectorstore.server import AliasStore


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


__all__ = [
    "AliasStore",
    "Bm25",
    "Collection",
    "EdgeStore",
    "Hit",
    "PointData",
    "Search",
    "Sparse",
    "StoreUnavailable",
    "VectorStore",
    "average_words",
    "embedded_root",
    "open_store",
    "point_id",
    "query_bm25",
    "version_name",
]
