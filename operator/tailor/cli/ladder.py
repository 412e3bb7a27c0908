"""The customization ladder the quickstart measures, as an Evaluation: zero-shot, few-shot,
RAG and LoRA + RAG (``RUNGS``) on the served endpoints, scored on APIBench Torch Hub eval
questions as the RAFT paper scores them (accuracy with its 95% interval, exact match,
hallucination rate), with latency, cost per query, a paired test against RAG and the
recommendation: the product's own measurement, so the quickstart and a user's Evaluation
measure the same way.

``report`` prints a sample exchange, then creates the Evaluation (named by what is served
and how many questions, so a second ``make up`` with the same revisions shows the finished
one again instead of asking the same questions) and prints its table live until it
finishes; the table also goes to ``ladder.json`` and the Evaluation's ``report.png`` is
named. Requests for the sample go through the one chat client."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailor.devcluster.kube import Kube
    from tailor.workloads.evaluation.chat import ChatClient

DEPLOYMENT = "api-assistant"
FEWSHOT = "api-assistant-fewshot"
ADAPTER = "torchhub"
EVAL_DEFAULT = 48
"""Eval questions of the default ladder (a seeded sample of the 186; ``--eval-all``)."""
TARGET = 0.5
"""The ladder's bar: accuracy (the paper's metric) at the interval's lower bound."""
RUNGS = (
    # (candidate, ModelDeployment, adapter, retrieval)
    ("zero-shot", DEPLOYMENT, None, False),
    ("few-shot", FEWSHOT, None, False),
    ("rag", DEPLOYMENT, None, True),
    ("lora-rag", DEPLOYMENT, ADAPTER, True),
)
QUESTIONS = {"configMap": {"name": "torchhub-eval", "key": "eval.jsonl"}}
"""The 186 eval questions as Evaluation records (``quickstart_data.load_data``)."""


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


def evaluation(count: int | None, revision: str) -> dict[str, Any]:
    """The ladder's Evaluation: ``count`` questions (a seeded sample; every one for None)
    on what ``revision`` says is served."""
    digest = hashlib.sha256(f"{revision}:{count}".encode()).hexdigest()[:8]
    candidates = [
        {
            "name": name,
            "deploymentRef": {"name": md},
            **({"adapter": adapter} if adapter else {}),
            **({} if retrieval else {"retrieval": False}),
        }
        for name, md, adapter, retrieval in RUNGS
    ]
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": f"ladder-{digest}", "labels": {"tailor.dev/ladder": "quickstart"}},
        "spec": {
            "questions": QUESTIONS,
            **({"sample": {"size": count, "seed": 42}} if count else {}),
            "scoring": {"type": "apibench", "corpus": "torchhub"},
            "candidates": candidates,
            "baseline": "rag",
            "target": {"metric": "accuracy", "min": TARGET},
            "concurrency": 16,
            "maxTokens": 64,
        },
    }


def sample_exchange(endpoint: str) -> None:
    from tailor.workloads.evaluation.chat import ChatClient

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


def report(
    kube: Kube,
    namespace: str,
    endpoint: str,
    eval_count: int | None,
    revision: str,
    folder: Path,
    again: bool = False,
    timeout: float = 3600,
) -> None:
    """The sample exchange, then the ladder's Evaluation followed live until it finishes;
    its table is stored in ``folder/ladder.json``."""
    from tailor.cli.eval import table

    sample_exchange(endpoint)
    manifest = evaluation(eval_count, revision)
    name = manifest["metadata"]["name"]
    if again:
        kube.kubectl("delete", "evaluation", name, "-n", namespace, "--ignore-not-found")
    existing = kube.kubectl("get", "evaluation", name, "-n", namespace, check=False).returncode == 0
    say(
        f"\nThe customization ladder on {eval_count or 'all 186'} APIBench Torch Hub eval "
        f"questions, measured on the served endpoints by Evaluation {name}"
        + (" (finished earlier for these revisions; --eval-again re-measures)" if existing else "")
        + f" (`kubectl get eval -n {namespace}`):"
    )
    say(
        "  accuracy: the RAFT paper's metric (a real Torch Hub API of the question's domain), "
        "with its 95% interval; exact: the gold API; hallucination: no such API"
    )
    if not existing:
        kube.apply(manifest, "-n", namespace)
    started = time.monotonic()
    last: tuple[Any, ...] = ()
    while True:
        body = kube.get_json("evaluation", name, "-n", namespace)
        status = body.get("status") or {}
        phase = status.get("phase")
        if phase == "Failed":
            raise SystemExit(f"the ladder's Evaluation {name} failed:\n{table(body)}")
        if phase == "Succeeded":
            break
        # live: a line when the candidate asked changes, and every 30 s
        progress = status.get("progress") or {}
        elapsed = time.monotonic() - started
        now = (phase, progress.get("candidate"), int(elapsed // 30))
        if now != last:
            say(
                f"  [{elapsed:4.0f}s] {phase or 'Pending'}: "
                + (
                    f"asking {progress['candidate']}, {progress.get('answered')}/"
                    f"{progress.get('total')} answered"
                    if progress.get("candidate")
                    else "waiting to start"
                )
            )
            last = now
        if elapsed > timeout:
            raise SystemExit(f"the ladder's Evaluation {name} did not finish in {timeout:.0f}s")
        time.sleep(2)
    say(table(body))
    status = body["status"]
    stored = folder / "ladder.json"
    stored.write_text(
        json.dumps(
            {"evaluation": name, "questions": status.get("questions"),
             "model": "SmolLM2-135M-Instruct", "candidates": status.get("candidates"),
             "recommendation": status.get("recommendation"), "report": status.get("report")},
            indent=2,
        )
    )  # fmt: skip
    say(f"  table: {stored}   report: {(status.get('report') or {}).get('uri')} (report.png)")
