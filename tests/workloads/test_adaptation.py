"""spec.adaptation end to end: the real MiniLM fine-tuned on labelled APIBench questions,
indexed into Qdrant Edge, and read back by a Retriever; plus the pure helpers.

Training is real and seeded; the pairs are kept small (a few hundred, one or two epochs) so a
test trains in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tailor.api.knowledgebase import Adaptation, KnowledgeBaseStatus
from tailor.api.workloads import IndexRun, Paths
from tailor.data import apibench_dir
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import load_questions
from tailor.workloads.knowledge.adaptation import (
    Pair,
    no_duplicate_batches,
    rank_scores,
    read_pairs,
    split,
)
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.knowledge.retriever import Retriever, load_embedder
from tailor.workloads.knowledge.vectorstore import EdgeStore
from tailor.workloads.progress import ProgressReporter

pytestmark = pytest.mark.workloads

APIBENCH = apibench_dir()
FORMAT = {
    "json": {
        "textFields": ["domain", "functionality", "description"],
        "idField": "api_call",
        "titleField": "api_name",
    }
}


def cards() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (APIBENCH / "torchhub_api.jsonl").open()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path, adaptation: dict[str, Any], **qdrant: Any) -> IndexRun:
    return IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "test", "name": "th"},
            "paths": {"artifacts": str(root / "artifacts"), "pvcs": str(root / "pvc")},
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "kb", "path": "cards.jsonl"}}],
                "format": FORMAT,
                "chunking": {"strategy": "none"},
                "embedding": {"batchSize": 32},
                "adaptation": adaptation,
            },
            "target": {
                "alias": "th",
                "path": str(root / "qdrant"),
                "embedders": str(root / "embedders"),
                "qdrant": qdrant,
            },
            "mode": "incremental",
        }
    )


def labelled(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Torch Hub training questions as {question, document} pairs."""
    train = load_questions(APIBENCH / "torchhub_train.json")
    random.Random(seed).shuffle(train)
    return [{"question": q.question, "document": q.api_call} for q in train[:n]]


def test_labelled_questions_tune_the_model_the_index_and_its_readers_use(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pvc" / "kb" / "cards.jsonl", cards())
    write_jsonl(tmp_path / "pvc" / "kb" / "pairs.jsonl", labelled(160))
    adaptation = {
        "questions": {"pvc": {"claimName": "kb", "path": "pairs.jsonl"}},
        "epochs": 1,
        "learningRate": 1e-4,
    }
    run = make_run(tmp_path, adaptation, keepCollections=0)
    patches: list[dict[str, Any]] = []
    stats = build_index(run, ProgressReporter(patches.append, 0))

    reported = [p["adaptation"] for p in patches if "adaptation" in p]
    assert len(reported) == 1
    status = KnowledgeBaseStatus.model_validate({"adaptation": reported[0]}).adaptation
    assert status is not None
    assert (status.pairs, status.trained, status.held_out, status.unmatched) == (160, 128, 32, 0)
    # the held-out questions (same cards, questions never trained on) rank better
    assert status.after.hit_at_5 > status.before.hit_at_5, status
    assert status.after.mrr > status.before.mrr, status
    assert status.kept and status.model.startswith("minilm-l6-v2/384+adapted-")
    # each distinct text embedded once, by the tuned model (vectors reused from the scoring;
    # twins that share their text share the vector)
    texts = {tuple(card[f] for f in FORMAT["json"]["textFields"]) for card in cards()}
    assert (stats.chunks, stats.embedded) == (94, len(texts))

    metadata = EdgeStore(tmp_path / "qdrant").version_metadata("th-v1")
    folder = tmp_path / "embedders" / metadata["tailorEmbedder"]
    assert (folder / "config.json").is_file() and (folder / "adaptation.json").is_file()

    # a reader embeds questions with the version's model, not the base
    reader = Retriever(run.target, run.paths)
    tuned = reader.embedder_of(reader._searchable())
    base = load_embedder(run.spec.embedding, run.paths)
    assert tuned is not base and Path(tuned.location) == folder
    question = "Recommend a model that detects objects in real time on a phone."
    assert float(tuned.embed_queries([question])[0] @ base.embed_queries([question])[0]) < 0.9999
    assert reader.search(question, top_k=3)

    # a refresh with the same pairs and documents trains nothing and changes nothing
    again = build_index(run)
    assert (again.changed, again.embedded, again.collection) == (False, 0, "th-v1")

    # other pairs: a new model, and the one no version uses any more is deleted
    write_jsonl(tmp_path / "pvc" / "kb" / "pairs.jsonl", labelled(40, seed=1))
    third = build_index(make_run(tmp_path, adaptation | {"epochs": 1}, keepCollections=0))
    assert third.collection == "th-v2"
    remaining = {p.name for p in (tmp_path / "embedders").iterdir()}
    assert folder.name not in remaining


def test_adaptation_that_does_not_beat_the_base_model_is_not_used(tmp_path: Path) -> None:
    # Questions that are the documents' own text: the base model already ranks each first,
    # so no tuned model can rank the held-out documents better.
    distinct: dict[str, dict[str, Any]] = {}
    for card in cards():
        distinct.setdefault(card["description"], card)
    rows = list(distinct.values())[:20]  # a few held out; each pair is long to train on
    write_jsonl(tmp_path / "pvc" / "kb" / "cards.jsonl", rows)
    pairs = [
        {
            "q": f"domain: {c['domain']}\nfunctionality: {c['functionality']}\n"
            f"description: {c['description']}",
            "doc": c["api_call"],
        }
        for c in rows
    ]
    pairs.append({"q": "a question about a document that was removed", "doc": "gone"})
    write_jsonl(tmp_path / "pvc" / "kb" / "pairs.jsonl", pairs)
    adaptation = {
        "questions": {"pvc": {"claimName": "kb", "path": "pairs.jsonl"}},
        "questionField": "q",
        "documentField": "doc",
        "epochs": 1,
    }
    run = make_run(tmp_path, adaptation)
    patches: list[dict[str, Any]] = []
    build_index(run, ProgressReporter(patches.append, 0))
    status = next(p["adaptation"] for p in patches if "adaptation" in p)
    assert status["unmatched"] == 1 and status["pairs"] == len(rows)
    assert status["before"]["hitAt1"] == 1.0 and status["kept"] is False
    assert status["model"] == "minilm-l6-v2/384"
    assert EdgeStore(tmp_path / "qdrant").version_metadata("th-v1")["tailorEmbedder"] is None
    # only the verdict is kept (so a refresh does not train again), not a model
    (folder,) = (tmp_path / "embedders").iterdir()
    assert [p.name for p in folder.iterdir()] == ["adaptation.json"]
    reader = Retriever(run.target, run.paths)
    assert reader.embedder_of(reader._searchable()) is load_embedder(run.spec.embedding, run.paths)


def test_pairs_that_name_no_indexed_document_fail_naming_the_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pvc" / "kb" / "cards.jsonl", cards()[:20])
    rows = [{"question": f"question {i}", "document": f"model-{i}"} for i in range(30)]
    write_jsonl(tmp_path / "pvc" / "kb" / "pairs.jsonl", rows)
    run = make_run(tmp_path, {"questions": {"pvc": {"claimName": "kb", "path": "pairs.jsonl"}}})
    with pytest.raises(WorkloadError) as failed:
        build_index(run)
    assert failed.value.reason == "InvalidAdaptation"
    message = str(failed.value)
    assert "spec.adaptation.questions: 0 of 30 pairs" in message
    assert "'model-0'" in message and "idField" in message
    assert EdgeStore(tmp_path / "qdrant").active("th") is None  # nothing published


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"document": "x"}, "pairs.jsonl:2: no question in field 'question'"),
        ({"question": "q?"}, "pairs.jsonl:2: no document id in field 'document'"),
        (["q?", "x"], "pairs.jsonl:2: expected a JSON object"),
    ],
)
def test_a_bad_pair_is_named_with_its_line(tmp_path: Path, record: Any, expected: str) -> None:
    write_jsonl(tmp_path / "kb" / "pairs.jsonl", [{"question": "q", "document": "d"}, record])
    adaptation = Adaptation.model_validate(
        {"questions": {"pvc": {"claimName": "kb", "path": "pairs.jsonl"}}}
    )
    with pytest.raises(WorkloadError) as failed:
        read_pairs(adaptation, Paths(artifacts=str(tmp_path), pvcs=str(tmp_path)))
    assert failed.value.reason == "InvalidAdaptation"
    assert f"spec.adaptation.questions: {tmp_path}/kb/{expected}" in str(failed.value)


def test_rank_scores_rank_documents_by_their_best_chunk() -> None:
    chunks = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    owners = ["a", "b", "b", "c"]
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]], dtype=np.float32)
    # q0: a (1.0) > c (0.8) > b (0.6): gold c is 2nd; q1: b first; q2: b (0.99) c (0.99) a
    scores = rank_scores(queries, chunks, owners, ["c", "b", "a"])
    assert (scores.hit_at_1, scores.hit_at_5) == (round(1 / 3, 4), 1.0)
    assert scores.mrr == round((1 / 2 + 1 + 1 / 3) / 3, 4)


def test_batches_never_hold_a_text_twice_and_split_is_seeded() -> None:
    pairs = [(f"q{i % 7}", f"d{i % 5}", None) for i in range(40)]
    batches = no_duplicate_batches(pairs, 4, random.Random(0))
    for batch in batches:
        texts = [t for pair in batch for t in pair if t is not None]
        assert len(texts) == len(set(texts)) and 1 < len(batch) <= 4
    # a hard negative counts as one of the batch's texts; a missing one as none
    triples = [(f"q{i}", f"d{i}", f"d{i + 1}" if i % 2 else None) for i in range(12)]
    for batch in no_duplicate_batches(triples, 4, random.Random(0)):
        texts = [t for triple in batch for t in triple if t is not None]
        assert len(texts) == len(set(texts))
    items = [Pair(f"q{i}", "d", f"f:{i}") for i in range(50)]
    train, held = split(items, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    assert split(items, 0.2, seed=3) == (train, held)
