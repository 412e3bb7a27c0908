"""Retrieval quality on APIBench (not a test): hit@1, hit@5 and MRR per retrieval stage.

For each hub (Torch Hub: 94 API cards, 186 eval questions; HuggingFace: 936 cards, 911 eval
questions, from the repository's copies of APIBench), the cards are indexed by the real
index workload into Qdrant Edge with the builtin MiniLM (text fields domain, functionality,
description: the ones ``docs/examples`` use), and each eval question is searched:

- ``dense``: MiniLM cosine (the default),
- ``bm25``: Qdrant's BM25 alone (English stop words and stemmer, IDF modifier),
- ``hybrid``: both fused by reciprocal rank fusion (``retrieval.hybrid: true``),
- ``+ past questions`` (Torch Hub only, the hub whose training questions the repository
  holds): the 837 training questions indexed as extra points of their gold card, the
  simplest form of learning from labelled questions; it is measured, not built into the
  KnowledgeBase API.

A hit is the gold ``api_call`` among the cards returned (cards sharing an api_call count as
one). 43 of Torch Hub's 94 cards share their text with another card, so which twin ranks
first is a tie the engine breaks by point id; the numbers move by a few points with it.

    HF_HUB_OFFLINE=1 python tests/bench/bench_retrieval.py [--hubs torchhub,huggingface]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tailor.api.workloads import IndexRun
from tailor.data import apibench_dir
from tailor.workloads.apibench import Question, load_questions
from tailor.workloads.index import build_index
from tailor.workloads.retriever import Retriever
from tailor.workloads.vectorstore import Hit, Search, query_bm25

FIELDS = ["domain", "functionality", "description"]


def make_run(root: Path, name: str, files: list[str]) -> IndexRun:
    return IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": name},
            "paths": {"artifacts": str(root / "artifacts"), "pvcs": str(root / "pvc")},
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "kb", "path": f}} for f in files],
                "format": {
                    "json": {
                        "textFields": FIELDS,
                        "titleField": "api_name",
                        "metadataFields": ["api_call"],
                    }
                },
                "chunking": {"strategy": "none"},
                "embedding": {"batchSize": 32},
            },
            "target": {"alias": name, "path": str(root / "qdrant")},
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


def evaluate(root: Path, hub: str, past_questions: bool) -> dict[str, dict[str, float]]:
    apibench = apibench_dir()
    pvc = root / "pvc" / "kb"
    pvc.mkdir(parents=True, exist_ok=True)
    shutil.copy(apibench / f"{hub}_api.jsonl", pvc)
    files = [f"{hub}_api.jsonl"]
    if past_questions:
        train = load_questions(apibench / f"{hub}_train.json")
        rows = [
            {"description": t.question, "api_call": t.api_call, "api_name": t.api_name}
            for t in train
        ]
        (pvc / "past.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append("past.jsonl")
    run = make_run(root, hub, files)
    build_index(run)
    questions = load_questions(apibench / f"{hub}_eval.json")
    retriever = Retriever(run.target, run.paths)
    vectors = retriever.embedder.embed_queries([q.question for q in questions])
    bm25 = query_bm25("english")
    out: dict[str, dict[str, float]] = {}
    for mode in ("dense", "bm25", "hybrid"):
        searches = [
            Search(
                dense=v.tolist(),
                limit=50,  # past questions repeat cards: dedupe after
                sparse=None if mode == "dense" else bm25.query(q.question),
                candidates=100,
                sparse_only=mode == "bm25",
            )
            for q, v in zip(questions, vectors, strict=True)
        ]
        out[mode] = scores(retriever.query(searches), questions)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubs", default="torchhub,huggingface")
    args = parser.parse_args()
    rows: list[tuple[str, str, dict[str, float]]] = []
    for hub in args.hubs.split(","):
        variants = [False, True] if (apibench_dir() / f"{hub}_train.json").is_file() else [False]
        for past in variants:
            root = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
            try:
                label = hub + (" + past questions" if past else "")
                for mode, measured in evaluate(root, hub, past).items():
                    rows.append((label, mode, measured))
                    print(f"{label:28s} {mode:7s} " + _fmt(measured), flush=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    print(f"\n| {'index':28s} | stage  | hit@1 | hit@5 |  MRR  |")
    print(f"|{'-' * 30}|--------|-------|-------|-------|")
    for label, mode, m in rows:
        print(f"| {label:28s} | {mode:6s} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | {m['mrr']:.3f} |")


def _fmt(m: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items())


if __name__ == "__main__":
    main()
