"""The customization ladder the quickstart measures on its served endpoints: zero-shot,
few-shot, RAG and LoRA + RAG (``RUNGS``), each scored on APIBench Torch Hub eval questions
as the RAFT paper scores them (accuracy, exact match, hallucination rate) with its p50
latency and cost per query; ``report`` prints a sample exchange and the table, reuses the
stored table while the served revisions are the same, and writes ``ladder.json`` and a PNG
chart (``chart``). Requests go through the one chat client
(:class:`tailor.workloads.evaluation.chat.ChatClient`)."""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailor.workloads.evaluation.apibench import Corpus, Question
    from tailor.workloads.evaluation.chat import ChatClient

DEPLOYMENT = "api-assistant"
FEWSHOT = "api-assistant-fewshot"
ADAPTER = "torchhub"
EVAL_DEFAULT = 48
"""Eval questions of the default ladder (evenly spaced over the 186; ``--eval-all``)."""
RUNGS = (
    # (row, ModelDeployment, model, retrieval)
    ("zero-shot", DEPLOYMENT, DEPLOYMENT, False),
    ("few-shot", FEWSHOT, FEWSHOT, False),
    ("RAG", DEPLOYMENT, DEPLOYMENT, True),
    ("LoRA + RAG", DEPLOYMENT, f"{DEPLOYMENT}/{ADAPTER}", True),
)


def say(text: str) -> None:
    """A line of the quickstart's output, flushed (``make up`` pipes it)."""
    print(text, flush=True)


def ask(client: ChatClient, model: str, question: str, retrieval: bool = True) -> dict[str, Any]:
    """One question to ``model``, greedy, with or without the deployment's retrieval: the
    whole response (the answer and Tailor's ``tailor.sources``)."""
    messages = [{"role": "user", "content": question}]
    return client.complete(
        messages, model=model, temperature=0, max_tokens=64, tailor={"retrieval": retrieval}
    )


def eval_questions(data: Path, count: int | None) -> list[Question]:
    """``count`` eval questions evenly spaced over the file (all of them for ``None``)."""
    from tailor.workloads.evaluation.apibench import load_questions

    questions = load_questions(data / "torchhub_eval.json")
    if count is None or count >= len(questions):
        return questions
    return [questions[i * len(questions) // count] for i in range(count)]


def measure(
    endpoint: str,
    model: str,
    retrieval: bool,
    questions: list[Question],
    corpus: Corpus,
    workers: int = 16,
) -> dict[str, Any]:
    """One rung: the paper's accuracy, exact, hallucination, p50 latency and cost per
    query (device-seconds: the serving process is busy for the wall time of the batch)."""
    from tailor.workloads.evaluation.apibench import score_totals
    from tailor.workloads.evaluation.chat import ChatClient

    latencies: list[float] = []

    def one(q: Question) -> Any:
        began = time.monotonic()
        reply = ask(client, model, q.question, retrieval)["choices"][0]["message"]["content"]
        latencies.append(time.monotonic() - began)
        return corpus.score(reply or "", q.api_call, q.domain)

    began = time.monotonic()
    with ChatClient(endpoint) as client, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(one, questions))
    wall = time.monotonic() - began
    return {
        **score_totals(verdicts),
        "p50Seconds": round(statistics.median(latencies), 3),
        "costDeviceSecondsPerQuery": round(wall / max(1, len(questions)), 3),
        "wallSeconds": round(wall, 1),
    }


def chart(table: dict[str, dict[str, Any]], path: Path) -> bool:
    """Accuracy, exact and hallucination per rung, and accuracy against cost (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rungs = list(table)
    fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for offset, (key, label) in enumerate(
        (("accuracy", "accuracy (paper)"), ("exact", "exact"), ("hallucination", "hallucination"))
    ):
        xs = [i + (offset - 1) * width for i in range(len(rungs))]
        bars.bar(xs, [100 * table[r][key] for r in rungs], width, label=label)
    bars.set_xticks(range(len(rungs)), rungs)
    bars.set_ylabel("% of eval questions")
    bars.set_ylim(0, 100)
    bars.legend(loc="upper left", fontsize=8)
    bars.set_title("APIBench Torch Hub, SmolLM2-135M")
    for rung in rungs:
        x, y = table[rung]["costDeviceSecondsPerQuery"], 100 * table[rung]["accuracy"]
        cost.scatter([x], [y], s=60)
        cost.annotate(rung, (x, y), textcoords="offset points", xytext=(6, 4))
    cost.set_xlabel("cost per query (device-seconds)")
    cost.set_ylabel("accuracy (paper's metric), %")
    cost.set_ylim(0, 100)
    cost.set_title("accuracy vs cost per rung")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    endpoints: dict[str, str], data: Path, eval_count: int | None, revision: str, folder: Path
) -> None:
    """The sample exchange and the ladder table, stored in ``folder`` (``ladder.json``,
    ``ladder.png``) and reused while ``revision`` (what is served) and the questions stay."""
    from tailor.workloads.evaluation.apibench import Corpus
    from tailor.workloads.evaluation.chat import ChatClient

    endpoint = endpoints[DEPLOYMENT]
    question = "I need to estimate the depth of objects in a single photo. Which model?"
    with ChatClient(endpoint) as client:
        answer = ask(client, f"{DEPLOYMENT}/{ADAPTER}", question)
    sources = [
        s.get("title") or s.get("id") for s in (answer.get("tailor") or {}).get("sources", [])
    ]
    say("\nSample exchange (model api-assistant/torchhub, with RAG):")
    say(f"  user:      {question}")
    reply = answer["choices"][0]["message"]["content"].strip()
    say("  assistant: " + reply.replace("\n", "\n             "))
    say(f"  sources:   {', '.join(map(str, sources))}")

    questions = eval_questions(data, eval_count)
    corpus = Corpus.load(data / "torchhub_api.jsonl")
    # The table is a function of what is served (the deployments' revisions hash the
    # adapters, prompt revisions and index build) and of the questions: a second `make up`
    # shows the stored table instead of asking the same questions again.
    stored_path = folder / "ladder.json"
    key = f"{revision}:{len(questions)}"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    reused = stored.get("key") == key and bool(revision)
    say(
        f"\nThe customization ladder on {len(questions)} APIBench Torch Hub eval questions"
        + ("" if eval_count is None else " (evenly spaced; --eval-all for all 186)")
        + ", measured on the served endpoints"
        + (" (stored for this revision; --eval-again re-measures)" if reused else "")
        + ":"
    )
    say(
        "  accuracy: the RAFT paper's metric (a real Torch Hub API of the question's domain);"
        " exact: the gold API; hallucination: no such API"
    )
    say(
        f"  {'rung':12} {'accuracy':>9} {'exact':>7} {'halluc.':>8} {'p50 s':>7} {'cost/query':>11}"
    )
    table: dict[str, dict[str, Any]] = stored.get("rungs", {}) if reused else {}
    for label, md, model, retrieval in RUNGS:
        if label not in table:
            table[label] = measure(endpoints[md], model, retrieval, questions, corpus)
        row = table[label]
        say(
            f"  {label:12} {100 * row['accuracy']:8.1f}% {100 * row['exact']:6.1f}% "
            f"{100 * row['hallucination']:7.1f}% {row['p50Seconds']:7.2f} "
            f"{row['costDeviceSecondsPerQuery']:9.2f} s"
        )
    stored_path.write_text(
        json.dumps(
            {"key": key, "questions": len(questions), "model": "SmolLM2-135M-Instruct",
             "rungs": table},
            indent=2,
        )
    )  # fmt: skip
    png = folder / "ladder.png"
    pictured = chart(table, png)
    say(f"  table: {stored_path}" + (f"   chart: {png}" if pictured else ""))
