"""Benchmark of the prompting rung (not a test): ``python tests/bench/bench_prompting.py``.

APIBench Torch Hub with the builtin SmolLM2-135M-Instruct, scored the paper's way
(accuracy under Gorilla's AST metric, exact match of the gold call, hallucination), for
zero-shot, static few-shot (the pool's first k examples for every question) and similar
few-shot (the k pool examples nearest to each question by MiniLM cosine, what
``fewShotSelection: {select: similar}`` does at serve time), each without and with RAG (the
top 3 cards of a MiniLM knowledge base over the 94 cards in the template's context).

Every system gets the same system prompt, template, eval questions, greedy decoding,
``max_tokens`` and batching (all requests of a system submitted at once to one engine);
the messages are built by the gateway's own code (``build_messages``,
``select_examples``). The pool is the training questions (seeded shuffle), each with its
gold call as the answer. Options: ``--eval`` (93), ``--pool`` (400), ``--k`` (3),
``--max-tokens`` (64).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.api.modeldeployment import ModelDeploymentSpec  # noqa: E402
from tailor.api.promptprofile import FewShotExample, FewShotSelection, PromptProfileSpec  # noqa: E402
from tailor.api.workloads import IndexRun, Paths  # noqa: E402
from tailor.data import apibench_dir  # noqa: E402
from tailor.workloads.evaluation.apibench import SYSTEM, Corpus, score_totals  # noqa: E402
from tailor.workloads.knowledge.index import build_index  # noqa: E402
from tailor.workloads.knowledge.retriever import Retriever  # noqa: E402
from tailor.workloads.serving.engine.base import Chunk, SamplingParams  # noqa: E402
from tailor.workloads.serving.engine.builtin import Engine, load_engine  # noqa: E402
from tailor.workloads.serving.prompting import Message, build_messages, select_examples  # noqa: E402
from tests.bench.bench_raft import corpus_lines, kb_format, split  # noqa: E402

TEMPLATE = "{% if context %}API documentation:\n{{ context }}\n\n{% endif %}Task: {{ question }}"


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[str], float]:
    sinks: list[queue.SimpleQueue[Chunk]] = []
    started = time.perf_counter()
    for prompt in prompts:
        sinks.append(queue.SimpleQueue())
        engine.submit(prompt, None, SamplingParams(max_tokens=max_tokens), sinks[-1].put)
    texts = []
    for sink in sinks:
        parts = []
        while (chunk := sink.get(timeout=3600)).finish_reason is None:
            parts.append(chunk.text)
        texts.append("".join(parts) + chunk.text)
    return texts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=int, default=93)
    parser.add_argument("--pool", type=int, default=400)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    apibench = apibench_dir()
    train, evals = split(
        argparse.Namespace(hub="torchhub", seed=args.seed, train=args.pool, eval=args.eval)
    )
    pool = [FewShotExample(user=f"Task: {q.question}", assistant=q.api_call) for q in train]
    corpus = Corpus.load(apibench / "torchhub_api.jsonl")

    base = Path(tempfile.mkdtemp(prefix="tailor-bench-prompting-"))
    (base / "data").mkdir()
    (base / "data" / "api.jsonl").write_text(corpus_lines("torchhub"))
    paths = {"artifacts": str(base / "work"), "pvcs": str(base)}
    index = IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": "torchhub"},
            "paths": paths,
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "data", "path": "api.jsonl"}}],
                "format": kb_format("torchhub"),
                "chunking": {"strategy": "none"},
            },
            "target": {"alias": "torchhub", "retrieval": {"topK": 3}},
        }
    )
    build_index(index)
    retriever = Retriever(index.target, index.paths)
    documents = {q.question: retriever.search(q.question, top_k=3) for q in evals}
    embed = retriever.embedder.embed_queries

    spec = ModelDeploymentSpec.model_validate(
        {"baseModel": {"builtin": "smollm2-135m-instruct"}, "batching": {"maxBatchSize": 16}}
    )
    engine = load_engine(spec, [], Paths(artifacts=str(base / "work")))
    selections: dict[str, FewShotSelection | None] = {
        "zero-shot": None,
        f"static few-shot (k={args.k})": FewShotSelection(select="static", k=args.k, pool=pool),
        f"similar few-shot (k={args.k})": FewShotSelection(select="similar", k=args.k, pool=pool),
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, selection in selections.items():
        profile = PromptProfileSpec(system=SYSTEM, template=TEMPLATE, few_shot_selection=selection)
        for rag in (False, True):
            prompts = []
            for q in evals:
                question = f"Task: {q.question}"
                examples = select_examples(selection, question, embed) if selection else []
                messages = build_messages(
                    profile,
                    [Message("user", q.question)],
                    documents[q.question] if rag else [],
                    {},
                    examples,
                )
                prompts.append(engine.encode_chat([m.as_dict() for m in messages]))
            texts, seconds = generate(engine, prompts, args.max_tokens)
            verdicts = [
                corpus.score(t, q.api_call, q.domain) for t, q in zip(texts, evals, strict=True)
            ]
            label = f"{name}{' + RAG' if rag else ''}"
            rows[label] = {**score_totals(verdicts), "seconds": round(seconds, 1),
                           "prompt_tokens": sum(map(len, prompts)) // len(prompts),
                           "example": texts[0][:160]}  # fmt: skip
            print(label, json.dumps(rows[label]), flush=True)
    engine.close()

    gold_top3 = sum(
        any(d.document_id == q.api_call for d in documents[q.question]) for q in evals
    ) / len(evals)
    print(f"\nAPIBench Torch Hub, {len(evals)} eval questions, pool of {len(pool)} training "
          f"questions, SmolLM2-135M-Instruct, greedy, max_tokens {args.max_tokens}; "
          f"gold card among the 3 retrieved: {100 * gold_top3:.1f}%")  # fmt: skip
    print("| system | accuracy (paper) | exact | hallucination | mean prompt tokens | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {100 * r['accuracy']:.1f} | {100 * r['exact']:.1f} | "
              f"{100 * r['hallucination']:.1f} | {r['prompt_tokens']} | {r['seconds']} |")  # fmt: skip
    for rag in ("", " + RAG"):
        static = rows[f"static few-shot (k={args.k}){rag}"]["exact"]
        similar = rows[f"similar few-shot (k={args.k}){rag}"]["exact"]
        print(f"similar - static, exact{rag or ' (no RAG)'}: {100 * (similar - static):+.1f} "
              "points (goal >= +10)")  # fmt: skip


if __name__ == "__main__":
    main()
