"""The retriever library (tailor.workloads.knowledge.retriever) on small real indexes.

Real MiniLM, Qdrant Edge; the unreachable-server case uses a real closed port.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tailor.api.workloads import IndexRun, Paths, RetrieverConfig
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.knowledge.retriever import Retriever, RetrieverUnavailable, load_embedder
from tailor.workloads.knowledge.vectorstore import Search, query_bm25

pytestmark = pytest.mark.workloads

DOCS = [
    {"id": "billing-1", "text": "Invoices are sent on the first day of each month.",
     "metadata": {"team": "billing", "lang": "en"}},
    {"id": "billing-2", "text": "You can pay by card or by bank transfer.",
     "metadata": {"team": "billing", "lang": "en"}},
    {"id": "support-1", "text": "Our support desk answers within one business day.",
     "metadata": {"team": "support", "lang": "en"}},
    {"id": "support-2", "text": "Error XQ7731 means the license file has expired.",
     "metadata": {"team": "support", "lang": "en"}},
    {"id": "hr-1", "text": "Employees get twenty-five days of paid holiday a year.",
     "metadata": {"team": "hr", "lang": "en"}},
]  # fmt: skip


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> IndexRun:
    root = tmp_path_factory.mktemp("retriever")
    run = IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "faq"},
            "paths": {"artifacts": str(root / "artifacts")},
            "reporter": {"kind": "none"},
            "spec": {"sources": [{"inline": DOCS}], "chunking": {"strategy": "none"}},
            "target": {"alias": "faq", "retrieval": {"topK": 3}},
        }
    )
    assert build_index(run).chunks == len(DOCS)
    return run


def retriever(run: IndexRun, **retrieval: Any) -> Retriever:
    config = run.target.model_copy(
        update={"retrieval": run.target.retrieval.model_copy(update=retrieval)}
    )
    return Retriever(config, run.paths)


def test_search_returns_the_nearest_chunks_with_their_payload(index: IndexRun) -> None:
    results = retriever(index).search("when will I receive my invoice?")
    assert len(results) == 3  # retrieval.topK
    best = results[0]
    assert best.document_id == "billing-1"
    assert best.text == DOCS[0]["text"]
    assert best.metadata == {"team": "billing", "lang": "en"}
    assert best.source == "inline:sources[0]"
    assert 0 < best.score <= 1 and best.score > results[1].score
    assert len(retriever(index).search("invoice", top_k=5)) == 5


def test_filters_and_score_threshold(index: IndexRun) -> None:
    r = retriever(index)
    support = r.search("when will I receive my invoice?", filters={"team": "support"})
    assert {c.document_id for c in support} == {"support-1", "support-2"}
    either = r.search("holiday", top_k=5, filters={"team": ["hr", "billing"]})
    assert {c.document_id for c in either} == {"hr-1", "billing-1", "billing-2"}
    only = r.search("x", filters={"document_id": "hr-1"})
    assert [c.document_id for c in only] == ["hr-1"]
    both = r.search("invoice", top_k=5, filters={"team": "billing", "lang": ["en", "de"]})
    assert {c.document_id for c in both} == {"billing-1", "billing-2"}
    assert r.search("invoice", filters={"team": "nobody"}) == []
    assert r.search("when will I receive my invoice?", score_threshold=0.99) == []
    thresholded = r.search("when will I receive my invoice?", top_k=5, score_threshold=0.3)
    assert thresholded and all(c.score >= 0.3 for c in thresholded)


def test_hybrid_fuses_dense_and_bm25(index: IndexRun) -> None:
    query = "XQ7731"
    # the sparse half alone ranks the document holding the exact code first
    r = retriever(index, hybrid=True)
    sparse = query_bm25("english").query(query)
    top = r.query([Search(dense=[], limit=1, sparse=sparse, sparse_only=True)])[0][0]
    assert top.payload["document_id"] == "support-2"
    # and the fused (RRF) result puts it first too
    fused = r.search(query)
    assert fused[0].document_id == "support-2"
    assert fused[0].score <= 1.0  # a fusion score, not a cosine


def test_bm25_is_qdrants_with_stemming_and_stop_words(index: IndexRun) -> None:
    r = retriever(index)

    def keyword(text: str) -> list[str]:
        sparse = query_bm25("english").query(text)
        hits = r.query([Search(dense=[], limit=5, sparse=sparse, sparse_only=True)])[0]
        return [str(h.payload["document_id"]) for h in hits]

    # stemmed: "invoicing" and "holidays" match "Invoices" and "holiday"
    assert keyword("invoicing")[0] == "billing-1"
    assert keyword("holidays")[0] == "hr-1"
    # stop words carry no weight: a question of stop words alone matches nothing
    assert keyword("the of a by") == []
    # the WordPiece ids of the old hand-written BM25 split this code; Qdrant's keeps it whole
    assert keyword("xq7731") == ["support-2"]


def test_search_batch_matches_single_searches(index: IndexRun) -> None:
    r = retriever(index)
    queries = ["pay by card", "support response time", "vacation days"]
    batch = r.search_batch(queries, top_k=2)
    assert [[c.id for c in result] for result in batch] == [
        [c.id for c in r.search(q, top_k=2)] for q in queries
    ]
    assert [result[0].document_id for result in batch] == ["billing-2", "support-1", "hr-1"]
    assert r.search_batch([]) == []


def test_retrievers_share_the_model_and_the_index_copy(index: IndexRun) -> None:
    first, second = retriever(index), retriever(index)
    assert first.search("holiday")[0].document_id == second.search("holiday")[0].document_id
    assert first.embedder is second.embedder
    assert first._store.searchable("faq") is second._store.searchable("faq")


def test_embedding_token_ids_equals_sentence_transformers_encode(index: IndexRun) -> None:
    embedder = load_embedder(index.spec.embedding, index.paths)
    texts = [d["text"] for d in DOCS] + ["a longer text " * 40]
    ours = embedder.embed_token_ids(embedder.token_ids(texts))
    reference = embedder.model.encode(texts, normalize_embeddings=True)
    assert ours.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_unavailable_store_raises_retriever_unavailable(tmp_path: Path, index: IndexRun) -> None:
    paths = Paths(artifacts=str(tmp_path))
    empty = Retriever(RetrieverConfig(alias="never-built", path=str(tmp_path / "q")), paths)
    with pytest.raises(RetrieverUnavailable, match="'never-built' has no index yet"):
        empty.search("hello")

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = RetrieverConfig.model_validate(
        {"alias": "kb", "qdrant": {"url": f"http://127.0.0.1:{port}"}}
    )
    started = time.monotonic()
    with pytest.raises(RetrieverUnavailable, match="unreachable"):
        Retriever(config, paths, timeout_seconds=2).search("hello")
    assert time.monotonic() - started < 10


def test_qdrant_edge_errors_make_the_retriever_unavailable(index: IndexRun, tmp_path: Path) -> None:
    r = retriever(index)
    # a vector of another model's dimension (the index was rebuilt with another embedder)
    with pytest.raises(RetrieverUnavailable, match=r"Qdrant Edge cannot query faq-v1: .*dim"):
        r.query([Search(dense=[0.1] * 3, limit=1)])
    # a published folder whose shard is damaged
    root = tmp_path / "q"
    (root / "kb-v1" / "shard").mkdir(parents=True)
    (root / "kb-v1" / "tailor.json").write_text("{}")
    (root / "kb.json").write_text('{"alias": "kb", "collection": "kb-v1"}')
    broken = Retriever(RetrieverConfig(alias="kb", path=str(root)), index.paths)
    with pytest.raises(RetrieverUnavailable, match="Qdrant Edge cannot open"):
        broken.search("hello")
