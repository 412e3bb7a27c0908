"""A Qdrant server as the vector store, through qdrant-client: each version is a collection
and the alias a real Qdrant alias, moved with one ``update_collection_aliases`` call holding
the delete and the create, so queries see the old version or the new one, never neither."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from qdrant_client import QdrantClient, models

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
    VectorStore,
    conditions,
    oversampling,
    ranked,
    version_number,
)

log = logging.getLogger("tailor.workloads.knowledge.vectorstore.server")


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
