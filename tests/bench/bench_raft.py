"""RAFT on APIBench (Torch Hub or HuggingFace) with the builtin SmolLM2-135M: the paper's
Table 1 column, scored the paper's way.

Not a test: run it by hand and read the table. Everything is Tailor's own workloads,
in-process: the knowledge base over the hub's API corpus (MiniLM, embedded Qdrant; the
indexed text keeps the fields that name and place an API: name, domain, functionality,
call), ``raft_data`` on training questions, the trainer for two LoRA adapters on the same
questions with the same hyperparameters (domain-specific fine-tuning, DSF: the question
alone -> the answer; RAFT: the question with the gold document among distractors -> the
quoted chain of thought), one serve process with both adapters and the knowledge base,
and ``evaluate`` on the evaluation questions:

- the paper's protocol (``oracle``): the gold document among k distractors, the same
  documents for every system;
- end to end (``retriever``): the serve workload's own retrieval (top k + 1 documents).

Rows: base model 0-shot (question alone), base + RAG, DSF (question alone), DSF + RAG,
RAFT. Scoring: Gorilla's AST evaluation as the paper uses it (accuracy: a real API of the
question's domain), with exact (the gold API) and hallucination (no corpus API) beside it.

Torch Hub: the 837 training and 186 evaluation questions. HuggingFace: the 911 questions of
``huggingface_eval.json`` split with the seed (700 train / 211 eval by default; the
upstream train file is not shipped). The HuggingFace knowledge base holds the first card
of each ``api_name`` (907 of 936: ids must be unique), and so does the scoring corpus.

    .venv/bin/python tests/bench/bench_raft.py                          # Torch Hub, full
    .venv/bin/python tests/bench/bench_raft.py --hub huggingface        # HuggingFace
    .venv/bin/python tests/bench/bench_raft.py --train 150 --eval 40    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
from tailor.data import apibench_dir  # noqa: E402

APIBENCH = apibench_dir()
sys.path.insert(0, str(ROOT))

from tailor.api.workloads import (  # noqa: E402
    EvaluateRun,
    IndexRun,
    RaftDataRun,
    ServeRun,
    TrainRun,
)
from tailor.workloads.evaluation.apibench import load_questions, raft_question  # noqa: E402
from tailor.workloads.knowledge.index import build_index  # noqa: E402
from tailor.workloads.knowledge.retriever import Retriever  # noqa: E402
from tailor.workloads.raft.data import (  # noqa: E402
    Question,
    Stats,
    chat_record,
    context_for,
    generate,
    holdout_record,
    load_chunks,
    pick_distractors,
    resolve_gold,
)
from tailor.workloads.raft.evaluate import evaluate  # noqa: E402
from tailor.workloads.serving.app import create_app  # noqa: E402
from tailor.workloads.training.trainer import train  # noqa: E402
from tests.workloads.helpers import ThreadServer  # noqa: E402

OWNER = {"kind": "RAFTJob", "namespace": "bench", "name": "raft"}
ID_FIELD = {"torchhub": "api_call", "huggingface": "api_name"}
# Row -> (endpoint target, adapter it needs, protocols it runs under).
SYSTEMS: dict[str, tuple[dict[str, str], str | None, tuple[str, ...]]] = {
    "base (0-shot)": ({"model": "md", "context": "none"}, None, ("oracle",)),
    "base + RAG": ({"model": "md"}, None, ("oracle", "retriever")),
    "DSF": ({"model": "md/dsf", "context": "none"}, "dsf", ("oracle",)),
    "DSF + RAG": ({"model": "md/dsf"}, "dsf", ("oracle", "retriever")),
    "RAFT": ({"model": "md/raft"}, "raft", ("oracle", "retriever")),
}
PAPER = {  # RAFT paper, Table 1 (LLaMA2-7B unless named)
    "torchhub": {"base (0-shot)": 0.00, "base + RAG": 8.60, "DSF": 84.94, "DSF + RAG": 82.80,
                 "RAFT": 84.95},
    "huggingface": {"base (0-shot)": 0.22, "base + RAG": 26.43, "DSF": 61.06,
                    "DSF + RAG": 42.59, "RAFT": 74.00},
}  # fmt: skip


def kb_format(hub: str) -> dict[str, Any]:
    return {
        "json": {
            "textFields": ["api_name", "domain", "functionality", "api_call"],
            "idField": ID_FIELD[hub],
            "titleField": "api_name",
            "metadataFields": ["domain", "api_call"],
        }
    }


def split(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """(train, eval) questions of the hub, seeded."""
    if args.hub == "torchhub":
        train = load_questions(APIBENCH / "torchhub_train.json")
        evals = load_questions(APIBENCH / "torchhub_eval.json")
        random.Random(args.seed).shuffle(train)
        random.Random(args.seed).shuffle(evals)
        return train[: args.train or None], evals[: args.eval or None]
    questions = load_questions(APIBENCH / "huggingface_eval.json")
    random.Random(args.seed).shuffle(questions)
    # the evaluation questions are the split's last 211 whatever --train says, so a run on
    # fewer training questions is scored on (a prefix of) the same questions as a full one
    return questions[: min(args.train or 700, 700)], questions[700:][: args.eval or None]


def corpus_lines(hub: str) -> str:
    """The corpus file the knowledge base indexes: one card per id."""
    seen: set[str] = set()
    lines = []
    for line in (APIBENCH / f"{hub}_api.jsonl").read_text().splitlines():
        if line.strip():
            key = str(json.loads(line)[ID_FIELD[hub]])
            if key not in seen:
                seen.add(key)
                lines.append(line)
    return "\n".join(lines) + "\n"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def raft_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "knowledgeBaseRef": {"name": "kb"},
        "questions": {"source": {"pvc": {"claimName": "data", "path": "questions.jsonl"}}},
        "raft": {"oracleProbability": args.p, "distractors": args.distractors, "seed": args.seed},
        "fineTune": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
        "evaluation": {
            "holdout": 0.01,  # the evaluation uses torchhub_eval.json instead
            "matcher": "apibench",
            "maxTokens": args.max_tokens,
        },
    }


def train_adapter(work: Path, name: str, folder: str, args: argparse.Namespace) -> Path:
    run = TrainRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "method": "lora",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
                "dataset": {
                    "train": {"pvc": {"claimName": "work", "path": f"{folder}/train.jsonl"}},
                    "validation": {
                        "pvc": {"claimName": "work", "path": f"{folder}/validation.jsonl"}
                    },
                },
                "training": {
                    "epochs": args.epochs,
                    "batchSize": args.batch_size,
                    "learningRate": args.learning_rate,
                    "maxSeqLength": 1536,
                    "warmupRatio": 0.03,
                    "scheduler": "cosine",
                    "seed": args.seed,
                },
                "checkpoint": {"everySteps": 100000},
            },
            "outputDir": str(work / "adapters" / name),
            "checkpointDir": str(work / "checkpoints" / name),
            "paths": {"artifacts": str(work), "pvcs": str(work.parent)},
            "reporter": {"kind": "none"},
            "owner": {"kind": "FineTuneJob", "namespace": "bench", "name": name},
        }
    )
    started = time.monotonic()
    train(run)
    metrics = json.loads((work / "adapters" / name / "manifest.json").read_text())["metrics"]
    print(
        f"trained {name}: {metrics['steps']} steps, eval loss {metrics['evalLoss']:.3f}, "
        f"{metrics['tokensPerSecond']} tokens/s, {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return work / "adapters" / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", choices=sorted(ID_FIELD), default="torchhub")
    parser.add_argument("--train", type=int, default=0, help="training questions (0: all)")
    parser.add_argument("--eval", type=int, default=0, help="evaluation questions (0: all)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--p", type=float, default=0.8)
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated rows to run (adapters are trained only for these)",
    )
    args = parser.parse_args()
    chosen = [r.strip() for r in args.systems.split(",") if r.strip()]
    if unknown := sorted(set(chosen) - set(SYSTEMS)):
        parser.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    needed = {SYSTEMS[r][1] for r in chosen} - {None}
    started = time.monotonic()
    base = args.work or Path(tempfile.mkdtemp(prefix="tailor-bench-raft-"))
    work = base / "work"
    paths = {"artifacts": str(work), "pvcs": str(base)}
    train_questions, eval_questions = split(args)
    hub, id_field = args.hub, ID_FIELD[args.hub]

    # The knowledge base; end to end retrieves k + 1 documents, as many as the paper's context.
    (base / "data").mkdir(parents=True, exist_ok=True)
    (base / "data" / "api.jsonl").write_text(corpus_lines(hub))
    index = IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": hub},
            "paths": paths,
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "data", "path": "api.jsonl"}}],
                "format": kb_format(hub),
                "chunking": {"strategy": "none"},
            },
            "target": {"alias": hub, "retrieval": {"topK": args.distractors + 1}},
        }
    )
    build_index(index)

    # RAFT data from the training questions.
    write_jsonl(
        base / "data" / "questions.jsonl", [raft_question(q, id_field) for q in train_questions]
    )
    spec = raft_spec(args)
    data = RaftDataRun.model_validate(
        {
            "owner": OWNER,
            "paths": paths,
            "reporter": {"kind": "none"},
            "spec": spec,
            "knowledgeBase": index.target.model_dump(by_alias=True),
            "outputDir": str(work / "raft"),
        }
    )
    stats = generate(data)
    print(
        f"RAFT data: {stats.examples} examples, gold document in {stats.with_oracle:.0%}, "
        f"{stats.mean_context_tokens:.0f} context words on average",
        flush=True,
    )

    # DSF data: the same training questions, no documents, the plain answer.
    rows = [
        chat_record(q["question"], [], q["answer"])
        for q in (raft_question(q, id_field) for q in train_questions)
    ]
    cut = max(1, len(rows) // 20)
    write_jsonl(work / "dsf" / "train.jsonl", rows[cut:])
    write_jsonl(work / "dsf" / "validation.jsonl", rows[:cut])

    # The evaluation questions with the paper's context (gold + k distractors).
    chunks = load_chunks(index.target, index.paths)
    retriever = Retriever(index.target, index.paths)
    recipe = data.spec.raft
    held = [
        Question(r["question"], r["answer"], r["document_id"], f"eval[{i}]")
        for i, r in enumerate(raft_question(q, id_field) for q in eval_questions)
    ]
    held = resolve_gold(held, chunks, retriever, Stats())
    rng = random.Random(args.seed)
    distractors, _ = pick_distractors(held, chunks, recipe, retriever, rng)
    write_jsonl(
        work / "eval" / "holdout.jsonl",
        [
            holdout_record(q, context_for(q.gold, d, True, recipe.distractors, rng))
            for q, d in zip(held, distractors, strict=True)
            if q.gold is not None
        ],
    )

    adapters = {n: train_adapter(work, n, n, args) for n in ("dsf", "raft") if n in needed}
    serve = ServeRun.model_validate(
        {
            "spec": {"baseModel": {"builtin": "smollm2-135m-instruct"}},
            "servedName": "md",
            "adapters": [{"name": n, "path": str(p)} for n, p in adapters.items()],
            "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": "md"},
            "paths": paths,
            "knowledgeBase": index.target.model_dump(by_alias=True),
        }
    )
    table: dict[str, dict[str, Any]] = {"oracle": {}, "retriever": {}}
    with ThreadServer(create_app(serve)) as server:
        url = f"{server.url}/v1"
        for protocol in ("oracle", "retriever"):
            systems = {r: SYSTEMS[r][0] for r in chosen if protocol in SYSTEMS[r][2]}
            if not systems:
                continue
            spec["evaluation"]["protocol"] = protocol
            run = EvaluateRun.model_validate(
                {
                    "owner": OWNER,
                    "paths": paths,
                    "reporter": {"kind": "none"},
                    "spec": spec,
                    "knowledgeBase": index.target.model_dump(by_alias=True),
                    "datasetDir": str(work / "eval"),
                    "endpoints": {n: {"baseUrl": url, **t} for n, t in systems.items()},
                    "outputDir": str(work / f"evaluation-{protocol}"),
                }
            )
            table[protocol] = evaluate(run)["systems"]

    label = {"torchhub": "Torch Hub", "huggingface": "HuggingFace"}[hub]
    print(
        f"\nAPIBench {label}: {len(held)} eval questions, {stats.examples} RAFT training "
        f"examples from {len(train_questions)} questions"
        + (" (seeded split of huggingface_eval.json)" if hub == "huggingface" else "")
        + f", SmolLM2-135M-Instruct + LoRA, {args.epochs} epoch(s); "
        "accuracy / exact / hallucination in %, accuracy is the paper's metric"
    )
    print(f"{'system':15s} {'paper protocol':>20s} {'end to end':>20s} {'paper (7B)':>10s}")

    def cell(row: dict[str, Any] | None) -> str:
        if not row:
            return ""
        return "/".join(f"{100 * row[k]:.1f}" for k in ("accuracy", "exact", "hallucination"))

    for name in chosen:
        row, e2e = table["oracle"].get(name), table["retriever"].get(name)
        print(f"{name:15s} {cell(row):>20s} {cell(e2e):>20s} {PAPER[hub][name]:10.2f}")
    if table["retriever"]:
        gold = next(iter(table["retriever"].values()))["goldInContext"]
        print(f"\ngold document among the {args.distractors + 1} retrieved: {100 * gold:.1f}%")
    (work / "table.json").write_text(json.dumps({"hub": hub, "args": vars(args) | {"work": str(args.work)}, "table": table}, indent=2))  # fmt: skip
    print(f"results under {work}; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
