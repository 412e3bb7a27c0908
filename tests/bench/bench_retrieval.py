"""Retrieval quality on APIBench (not a test): hit@1, hit@5 and MRR per retrieval stage.

For each hub (Torch Hub: 94 API cards, 186 eval questions; HuggingFace: 936 cards, of which
895 distinct api_calls, 911 eval questions, from the repository's copies of APIBench), the
cards are indexed by the real index workload into Qdrant Edge (text fields domain,
functionality, description: the ones ``docs/examples`` use; one card per api_call, the
api_call its document id), and each eval question is searched:

- ``dense``: MiniLM cosine (the default), ``bm25``: Qdrant's BM25 alone (English stop words
  and stemmer, IDF modifier), ``hybrid``: both fused by reciprocal rank fusion;
- ``+ adaptation`` (``spec.adaptation``, the embedding model fine-tuned on labelled
  questions, default settings: 20% of the pairs held out, 3 epochs):
  - Torch Hub: on the 837 Torch Hub training questions, scored on the 186 eval questions;
  - HuggingFace, a domain it was not tuned on: the knowledge base embeds with the model the
    Torch Hub knowledge base tuned (``embedding.model.pvc``), no HuggingFace question seen;
  - HuggingFace, its own questions: the repository has no HuggingFace training file, so the
    911 eval questions are split in two (seeded); adaptation learns from one half and every
    stage of that row is scored on the other half (456 questions), the base included.

A hit is the gold ``api_call`` among the cards returned. 43 of Torch Hub's 94 cards share
their text with another card, so which twin ranks first is a tie the engine breaks by point
id; the numbers move by a few points with it.

    HF_HUB_OFFLINE=1 python tests/bench/bench_retrieval.py [--hubs torchhub,huggingface]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tailor.api.workloads import IndexRun
from tailor.data import apibench_dir
from tailor.workloads.evaluation.apibench import Question, load_questions
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.knowledge.retriever import Retriever
from tailor.workloads.knowledge.vectorstore import Hit, Search, query_bm25

FIELDS = ["domain", "functionality", "description"]


def make_run(
    root: Path, name: str, questions: str | None = None, model: str | None = None
) -> IndexRun:
    """An index of ``cards.jsonl`` on the bench claim; ``questions``: a file of labelled
    pairs there (spec.adaptation); ``model``: a folder there to embed with."""
    spec: dict[str, Any] = {
        "sources": [{"pvc": {"claimName": "kb", "path": "cards.jsonl"}}],
        "format": {
            "json": {
                "textFields": FIELDS,
                "idField": "api_call",
                "titleField": "api_name",
                "metadataFields": ["api_call"],
            }
        },
        "chunking": {"strategy": "none"},
        "embedding": {"batchSize": 32},
    }
    if questions:
        spec["adaptation"] = {"questions": {"pvc": {"claimName": "kb", "path": questions}}}
    if model:
        spec["embedding"]["model"] = {"pvc": {"claimName": "kb", "path": model}}
    return IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": name},
            "paths": {"artifacts": str(root / "artifacts"), "pvcs": str(root / "pvc")},
            "reporter": {"kind": "none"},
            "spec": spec,
            "target": {
                "alias": name,
                "path": str(root / name / "qdrant"),
                "embedders": str(root / "pvc" / "kb" / "embedders"),
            },
            "mode": "full",
        }
    )


def scores(results: list[list[Hit]], questions: list[Question]) -> dict[str, float]:
    ranks: list[int | None] = []
    for question, hits in zip(questions, results, strict=True):
        calls = list(dict.fromkeys(h.payload.get("metadata", {}).get("api_call") for h in hits))
        ranks.append(calls.index(question.api_call) + 1 if question.api_call in calls else None)
    n = len(ranks)
    return {
        "hit@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "mrr": sum(1 / r for r in ranks if r) / n,
    }


def search(run: IndexRun, questions: list[Question], modes: tuple[str, ...]) -> dict[str, Any]:
    """Scores of each mode over the published index of ``run``."""
    retriever = Retriever(run.target, run.paths)
    collection = retriever._searchable()
    vectors = retriever.embedder_of(collection).embed_queries([q.question for q in questions])
    bm25 = query_bm25("english")
    out: dict[str, Any] = {}
    for mode in modes:
        searches = [
            Search(
                dense=v.tolist(),
                limit=50,
                sparse=None if mode == "dense" else bm25.query(q.question),
                candidates=100,
                sparse_only=mode == "bm25",
            )
            for q, v in zip(questions, vectors, strict=True)
        ]
        out[mode] = scores(retriever.query(searches, collection), questions)
    retriever.close()
    return out


def pairs_file(pvc: Path, name: str, questions: list[Question]) -> str:
    rows = [{"question": q.question, "document": q.api_call} for q in questions]
    (pvc / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return name


def adapted_model(run: IndexRun) -> str:
    """The tuned model folder of a finished adapted build, relative to the bench claim."""
    folders = [
        p for p in Path(run.target.embedders or "").iterdir() if (p / "config.json").is_file()
    ]
    assert len(folders) == 1, folders
    return f"embedders/{folders[0].name}"


def bench(root: Path, hubs: list[str]) -> list[tuple[str, str, dict[str, float]]]:
    apibench = apibench_dir()
    pvc = root / "pvc" / "kb"
    pvc.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, dict[str, float]]] = []

    def record(label: str, measured: dict[str, Any], extra: str = "") -> None:
        for mode, m in measured.items():
            rows.append((label, mode, m))
            print(f"{label:44s} {mode:7s} " + _fmt(m) + extra, flush=True)

    tuned_on_torchhub: str | None = None
    for hub in hubs:
        seen: set[str] = set()
        cards = []
        for line in (apibench / f"{hub}_api.jsonl").read_text().splitlines():
            card = json.loads(line)
            if card["api_call"] not in seen:
                seen.add(card["api_call"])
                cards.append(card)
        (pvc / "cards.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cards))
        questions = load_questions(apibench / f"{hub}_eval.json")
        modes = ("dense", "bm25", "hybrid")
        base = make_run(root, f"{hub}-base")
        build_index(base)
        record(hub, search(base, questions, modes))
        if hub == "torchhub":
            train = load_questions(apibench / "torchhub_train.json")
            run = make_run(root, "torchhub-adapted", pairs_file(pvc, "th-train.jsonl", train))
            started = time.monotonic()
            stats = build_index(run)
            took = f"  (build {time.monotonic() - started:.0f} s, {stats.chunks} cards)"
            record(
                f"{hub} + adaptation (837 train q.)",
                search(run, questions, ("dense", "hybrid")),
                took,
            )
            tuned_on_torchhub = adapted_model(run)
            # keep the folder: the HuggingFace rows embed with it
            shutil.copytree(pvc / tuned_on_torchhub, pvc / "torchhub-tuned")
        else:
            if tuned_on_torchhub:
                run = make_run(root, f"{hub}-th-model", model="torchhub-tuned")
                build_index(run)
                record(
                    f"{hub} + Torch Hub's tuned model", search(run, questions, ("dense", "hybrid"))
                )
            shuffled = list(questions)
            random.Random(7).shuffle(shuffled)
            learn, held = shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]
            label = f"{hub} (other half, {len(held)} q.)"
            record(label, search(base, held, ("dense", "hybrid")))
            run = make_run(root, f"{hub}-adapted", pairs_file(pvc, "hf-half.jsonl", learn))
            build_index(run)
            record(
                f"{label} + adaptation ({len(learn)} q.)", search(run, held, ("dense", "hybrid"))
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubs", default="torchhub,huggingface")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        rows = bench(root, args.hubs.split(","))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n| {'index':44s} | stage  | hit@1 | hit@5 |  MRR  |")
    print(f"|{'-' * 46}|--------|-------|-------|-------|")
    for label, mode, m in rows:
        print(f"| {label:44s} | {mode:6s} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | {m['mrr']:.3f} |")


def _fmt(m: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items())


if __name__ == "__main__":
    main()
