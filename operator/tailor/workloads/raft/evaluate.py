"""RAG against RAFT on held-out questions: ``python -m tailor.workloads.raft.evaluate --spec FILE``.

Asks every system (an OpenAI-compatible endpoint and model name: the base model with
retrieval, the RAFT adapter, ...) the held-out questions the data stage set aside, and
scores the answers. Two protocols:

- ``oracle`` (the paper's): the context is the gold document among k distractors, fixed
  per question by the data stage, so every system reads exactly the same documents;
- ``retriever`` (end to end): the question alone goes to the ModelDeployment, whose own
  knowledge-base retrieval supplies the context; whether the gold document was among the
  sources is recorded per question.

Matchers compare the final answer (the text after ``##Answer:``, or the whole reply), with
the gold matchers of :mod:`tailor.workloads.evaluation.scoring` (the Evaluation's too):
``exact`` and ``contains`` on normalised text (lower case, no punctuation or articles, as
SQuAD), ``regex`` (the gold answer is a regular expression, searched ignoring case) and
``apibench``, scored as the RAFT paper scores APIBench
(:mod:`tailor.workloads.evaluation.apibench`): the knowledge base's documents are the API
corpus (each needs ``api_call`` and ``domain``), the gold chunk gives the question's gold
call and domain, and every system gets accuracy (the paper's), exact and hallucination
rate. Requests go through :class:`~tailor.workloads.evaluation.chat.ChatClient` (retried
on connection errors, 408, 429 and 5xx); a question whose request fails for good is
recorded with its error and counts as wrong. Per-question results go to ``results.jsonl``, totals to
``summary.json`` and the RAFTJob's ``status.evaluation``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tailor.api.workloads import RAFT_HOLDOUT_FILE, EvalTarget, EvaluateRun
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import Corpus, Verdict, final_answer
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.evaluation.scoring import gold_matches
from tailor.workloads.io.records import iter_jsonl
from tailor.workloads.io.storage import artifact_uri, sha256_file, store_of
from tailor.workloads.program import run_main, write_termination_message
from tailor.workloads.progress import make_reporter
from tailor.workloads.raft.data import Doc, chat_record, load_chunks

log = logging.getLogger("tailor.workloads.raft.evaluate")

CONCURRENCY = 8
"""Requests in flight per system: the server batches them (continuous batching)."""


@dataclass(frozen=True)
class HeldOut:
    """A held-out question and the context the paper's protocol shows with it."""

    question: str
    answer: str
    gold_chunk_id: str
    context: list[Doc]


def load_holdout(dataset_dir: Path, limit: int | None = None) -> list[HeldOut]:
    path = dataset_dir / RAFT_HOLDOUT_FILE
    if not path.exists():
        raise WorkloadError(
            "DatasetNotFound", f"{path} does not exist: the data stage has not written it"
        )
    out = [
        HeldOut(
            question=r["question"],
            answer=r["answer"],
            gold_chunk_id=r["goldChunkId"],
            context=[Doc.from_record(d) for d in r["context"]],
        )
        for _, r in iter_jsonl(path)
    ]
    return out[:limit] if limit else out


@dataclass
class Result:
    """One question asked of one system."""

    system: str
    index: int
    question: str
    gold: str
    reply: str
    answer: str
    correct: bool
    gold_in_context: bool
    seconds: float
    error: str | None = None
    exact: bool = False
    hallucination: bool = False
    matched: str | None = None


def messages_for(item: HeldOut, protocol: str, target: EvalTarget) -> tuple[list[Any], bool]:
    """(messages, ask the server to retrieve) for one question."""
    if target.context == "none" or protocol == "retriever":
        question_only = chat_record(item.question, [])["messages"]
        return question_only, target.context != "none"
    return chat_record(item.question, item.context)["messages"], False


Scorer = Callable[[str, HeldOut], Verdict]


def text_scorer(matcher: str) -> Scorer:
    return lambda reply, item: Verdict(gold_matches(matcher, reply, item.answer), False, False)


def apibench_scorer(run: EvaluateRun) -> Scorer:
    """Gorilla's AST evaluation with the knowledge base's documents as the API corpus."""
    alias = run.knowledge_base.alias
    cards: dict[str, dict[str, Any]] = {}
    by_document: dict[str, dict[str, Any]] = {}
    for doc in load_chunks(run.knowledge_base, run.paths):
        card = by_document.setdefault(
            doc.document_id,
            {
                **doc.metadata,
                "api_call": doc.metadata.get("api_call") or doc.document_id,
                "api_name": doc.title or doc.document_id,
                "where": f"knowledge base {alias!r}, document {doc.document_id!r}",
            },
        )
        cards[doc.id] = card
    try:
        corpus = Corpus.from_records((c["where"], c) for c in by_document.values())
    except WorkloadError as exc:
        raise WorkloadError(
            "InvalidSpec",
            f"matcher apibench: {exc.message}; index API cards with "
            "format.json.metadataFields [domain, api_call] (or idField api_call), or use "
            "another spec.evaluation.matcher",
        ) from exc

    def scorer(reply: str, item: HeldOut) -> Verdict:
        card = cards.get(item.gold_chunk_id)
        if card is None:
            raise WorkloadError(
                "InvalidSpec",
                f"matcher apibench: the gold chunk {item.gold_chunk_id} of {item.question!r} "
                f"is not in knowledge base {alias!r} (rebuilt since the data stage?)",
            )
        return corpus.score(reply, str(card["api_call"]), str(card["domain"]))

    return scorer


def ask_all(
    name: str,
    target: EvalTarget,
    items: list[HeldOut],
    protocol: str,
    scorer: Scorer,
    max_tokens: int,
) -> list[Result]:
    """Every question to one system, ``CONCURRENCY`` at a time."""
    client = ChatClient(target.base_url, timeout=600)
    done = 0

    def one(index: int) -> Result:
        nonlocal done
        item = items[index]
        messages, retrieval = messages_for(item, protocol, target)
        started = time.monotonic()
        try:
            response = client.complete(
                messages,
                model=target.model,
                temperature=0,
                max_tokens=max_tokens,
                tailor={"retrieval": retrieval},
            )
            reply = str(response["choices"][0]["message"]["content"] or "")
            error = None
        except ChatError as exc:
            reply, response, error = "", {}, str(exc)
        if target.context == "none":
            in_context = False
        elif protocol == "retriever":
            sources = (response.get("tailor") or {}).get("sources") or []
            in_context = any(s.get("id") == item.gold_chunk_id for s in sources)
        else:
            in_context = any(d.id == item.gold_chunk_id for d in item.context)
        done += 1
        if done % 10 == 0 or done == len(items):
            log.info("%s: %d/%d questions answered", name, done, len(items))
        verdict = scorer(reply, item) if error is None else Verdict(False, False, True)
        return Result(
            system=name,
            index=index,
            question=item.question,
            gold=item.answer,
            reply=reply,
            answer=final_answer(reply),
            correct=error is None and verdict.correct,
            gold_in_context=in_context,
            seconds=round(time.monotonic() - started, 3),
            error=error,
            exact=verdict.exact,
            hallucination=verdict.hallucination,
            matched=verdict.matched,
        )

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(len(items))))
    finally:
        client.close()
    failed = [r for r in results if r.error]
    if len(failed) == len(results):
        raise RuntimeError(f"{name}: every request failed, e.g. {failed[0].error}")
    return results


def totals(results: list[Result], apibench: bool = False) -> dict[str, Any]:
    """Accuracy and counts of one system; with ``apibench``, exact and hallucination too."""
    correct = sum(r.correct for r in results)
    n = max(1, len(results))
    scored = apibench and bool(results)
    return {
        "accuracy": round(correct / len(results), 4) if results else None,
        "correct": correct,
        "total": len(results),
        "exact": round(sum(r.exact for r in results) / n, 4) if scored else None,
        "hallucination": round(sum(r.hallucination for r in results) / n, 4) if scored else None,
        "goldInContext": round(sum(r.gold_in_context for r in results) / max(1, len(results)), 4),
        "errors": sum(r.error is not None for r in results),
        "meanSeconds": round(sum(r.seconds for r in results) / max(1, len(results)), 3),
    }


def evaluate(run: EvaluateRun) -> dict[str, Any]:
    """Ask, score and write the results; returns the summary."""
    evaluation = run.spec.evaluation
    if evaluation.matcher == "regex":
        for item in load_holdout(Path(run.dataset_dir)):
            try:
                re.compile(item.answer)
            except re.error as exc:
                raise WorkloadError(
                    "InvalidQuestions",
                    f"matcher regex: the gold answer {item.answer!r} is not a regular "
                    f"expression ({exc}); use matcher contains or exact",
                ) from exc
    items = load_holdout(Path(run.dataset_dir), evaluation.max_questions)
    if not items:
        raise WorkloadError("DatasetNotFound", "no held-out questions to evaluate")
    if not run.endpoints:
        raise WorkloadError("InvalidSpec", "no system to evaluate (endpoints is empty)")
    log.info(
        "%d questions, protocol %s, matcher %s, systems %s",
        len(items),
        evaluation.protocol,
        evaluation.matcher,
        ", ".join(run.endpoints),
    )
    paper = evaluation.matcher == "apibench"
    scorer = apibench_scorer(run) if paper else text_scorer(evaluation.matcher)
    results: dict[str, list[Result]] = {}
    for name, target in run.endpoints.items():
        results[name] = ask_all(
            name, target, items, evaluation.protocol, scorer, evaluation.max_tokens
        )
        score_row = totals(results[name], paper)
        log.info(
            "%s: accuracy %s, exact %s, hallucination %s",
            name,
            score_row["accuracy"],
            score_row["exact"],
            score_row["hallucination"],
        )
    summary = {
        "protocol": evaluation.protocol,
        "matcher": evaluation.matcher,
        "questions": len(items),
        "systems": {name: totals(rows, paper) for name, rows in results.items()},
    }
    output = Path(run.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    partial = output / ".results.jsonl.partial"
    with partial.open("w", encoding="utf-8") as fh:
        for rows in results.values():
            for row in rows:
                fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    partial.replace(output / "results.jsonl")
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def status_patch(run: EvaluateRun, summary: dict[str, Any]) -> dict[str, Any]:
    output = Path(run.output_dir)
    systems = summary["systems"]
    keys = ("accuracy", "correct", "total", "exact", "hallucination")
    scores = {
        name: {key: systems[name][key] for key in keys if systems[name].get(key) is not None}
        for name in ("rag", "raft")
        if name in systems
    }
    return {
        "evaluation": {
            **scores,
            "protocol": summary["protocol"],
            "artifact": {
                "uri": artifact_uri(output, run.paths),
                "sha256": sha256_file(output / "results.jsonl"),
                "sizeBytes": (output / "results.jsonl").stat().st_size,
            },
        }
    }


def work(run: EvaluateRun) -> None:
    summary = evaluate(run)
    store = store_of(run.paths)
    if store:  # results and summary also land in the bucket
        store.push(run.output_dir)
    patch = status_patch(run, summary)
    make_reporter(run.reporter, run.owner).report(patch, final=True)
    # last: the operator calls the RAFTJob Succeeded only with this report
    write_termination_message("Evaluated", patch["evaluation"]["artifact"]["uri"], **patch)


def main(argv: list[str] | None = None) -> int:
    return run_main(EvaluateRun, work, argv)


if __name__ == "__main__":
    sys.exit(main())
