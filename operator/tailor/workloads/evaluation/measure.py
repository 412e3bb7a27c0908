"""An Evaluation's run: ``python -m tailor.workloads.evaluation.measure --spec FILE``.

1. **Questions**: the records of ``spec.questions``, checked against the scorer
   (:func:`tailor.workloads.evaluation.scoring.load_items`), then a seeded sample.
2. **Asking**: each candidate in turn (so its wall time is its own), ``spec.concurrency``
   requests in flight, through the one chat client (retried on connection errors, 408,
   429 and 5xx) at the ModelDeployment's Service: the gateway users hit, so latency and
   cost are the real ones. Every answer is appended to ``answers.jsonl`` (flushed and
   synced) before the next is counted: a restarted pod reads it and asks only what is
   missing. A request that fails for good is written with its error; it is not an answer
   (never scored as wrong, reported as ``errors``) and a restart asks it again.
3. **Scoring and statistics** (:mod:`.stats`): per candidate the metric with its 95%
   bootstrap interval, latency percentiles, tokens, cost per query in device-seconds (the
   candidate's wall time while it alone was asked, summed over the pods that asked it,
   times its deployment's devices, over the questions answered) and the exact McNemar
   p-value against the baseline on the questions both answered.
4. **Recommendation** with a target: the cheapest candidate (cost, then p50 latency) whose
   interval's lower bound reaches ``target.min``; else "none meets it: the best is X".
5. **Report**: ``report.json`` and ``report.png`` (metric against cost, with intervals)
   beside ``answers.jsonl`` in the Evaluation's artifacts folder (also in the bucket with
   the s3 store); the results go to the Evaluation's status and, last, to the
   termination message the operator reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tailor.api.evaluation import (
    METRICS,
    CandidateResult,
    EvaluationSpec,
    Interval,
    Recommendation,
)
from tailor.api.workloads import TEST_KEY_HEADER, CandidateTarget, EvaluationRun
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.apibench import Verdict
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.evaluation.judge import JUDGMENTS_FILE, agreed, judge_all, preference
from tailor.workloads.evaluation.scoring import Item, load_items, scorer
from tailor.workloads.evaluation.stats import mcnemar_exact, percentile, share_interval
from tailor.workloads.io.sources import read_secret
from tailor.workloads.io.storage import artifact_uri, sha256_file, store_of
from tailor.workloads.program import run_main, write_termination_message
from tailor.workloads.progress import ProgressReporter, make_reporter

log = logging.getLogger("tailor.workloads.evaluation.measure")

OUTCOMES_MAX = 2000
"""Questions up to which status.outcomes is kept (a status object holds about 1 MiB)."""
TERMINATION_BYTES = 3500
"""The termination message's budget (Kubernetes keeps 4096 bytes): beyond it the results
travel in the status patch alone."""
ANSWERS_FILE = "answers.jsonl"
REPORT_FILE = "report.json"
CHART_FILE = "report.png"
VERDICT_FLAGS = {"accuracy": "correct", "exact": "exact", "hallucination": "hallucination"}
"""Each metric's Verdict attribute."""


def sample(items: list[Item], spec: EvaluationSpec) -> list[Item]:
    """The seeded sample of ``spec.sample`` (in the source's order), or every item."""
    if spec.sample is None or spec.sample.size >= len(items):
        return items
    chosen = sorted(random.Random(spec.sample.seed).sample(range(len(items)), spec.sample.size))
    return [items[i] for i in chosen]


class RowLog:
    """``answers.jsonl`` (and ``judgments.jsonl``): one row per request, appended, flushed
    and synced under a lock (workers write from threads; a killed pod loses at most the row
    being written)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipping a torn last line", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def answered(self, candidate: str) -> set[str]:
        """Ids the candidate has answered (errors excluded: they are asked again)."""
        return {r["id"] for r in self.rows if r["candidate"] == candidate and not r.get("error")}

    def write(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.rows.append(row)

    def close(self) -> None:
        self.file.close()


def ask_candidate(
    name: str,
    target: CandidateTarget,
    items: list[Item],
    run: EvaluationRun,
    answers: RowLog,
    progress: ProgressReporter,
    total: int,
) -> None:
    """Every item the candidate has not answered yet, ``spec.concurrency`` at a time."""
    done = answers.answered(name)
    todo = [item for item in items if item.id not in done]
    if not todo:
        return
    log.info("%s: asking %d of %d questions (%s)", name, len(todo), len(items), target.model)
    api_key = (
        read_secret(target.api_key_secret_ref, run.paths) if target.api_key_secret_ref else None
    )
    headers: dict[str, str] = {}
    extension: dict[str, Any] = {"retrieval": target.retrieval}
    if target.test_key_secret_ref is not None:  # the deployment's own key: a profile the
        # request brings, and adapters still behind their evaluation gate, need it
        headers[TEST_KEY_HEADER] = read_secret(target.test_key_secret_ref, run.paths)
    if target.prompt_profile is not None:
        extension["promptProfile"] = target.prompt_profile
    attempt = f"{os.getpid()}-{time.time_ns()}"  # a pass: its rows' wall times add up once
    client = ChatClient(target.base_url, api_key=api_key, headers=headers, timeout=600)
    answered = sum(len(answers.answered(c)) for c in run.targets)
    count = threading.Lock()
    started = time.monotonic()

    def one(item: Item) -> None:
        nonlocal answered
        began = time.monotonic()
        try:
            response = client.complete(
                [{"role": "user", "content": item.question}],
                model=target.model,
                temperature=0,
                max_tokens=run.spec.max_tokens,
                tailor=extension,
            )
            reply = str(response["choices"][0]["message"]["content"] or "")
            tokens = (response.get("usage") or {}).get("completion_tokens")
            error = None
        except ChatError as exc:
            reply, tokens, error = "", None, str(exc)
        now = time.monotonic()
        answers.write(
            {
                "candidate": name,
                "id": item.id,
                "reply": reply,
                "seconds": round(now - began, 4),
                "completionTokens": tokens,
                "error": error,
                "pass": attempt,
                "promptProfileRevision": target.prompt_profile_revision,
                "wall": round(now - started, 4),
            }
        )
        with count:
            answered += error is None
            patch = {"progress": {"answered": answered, "total": total, "candidate": name}}
            progress.report(patch)

    with client, ThreadPoolExecutor(run.spec.concurrency) as pool:
        list(pool.map(one, todo))


def ask_judge(
    run: EvaluationRun, items: list[Item], rows: list[dict[str, Any]], output: Path
) -> list[dict[str, Any]]:
    """The judge's grades and comparisons of every answer (:mod:`.judge`), kept in
    ``judgments.jsonl`` as they come; returns every judgement row."""
    judge, target = run.spec.scoring.judge, run.judge
    if judge is None or target is None:
        raise WorkloadError("InvalidSpec", "scoring.type judge: the judge was not resolved")
    replies = {(r["candidate"], r["id"]): r["reply"] for r in rows if not r.get("error")}
    judgments = RowLog(output / JUDGMENTS_FILE)
    done: set[tuple[str, ...]] = {
        (r["kind"], r["candidate"], r["id"], r["order"])
        for r in judgments.rows
        if not r.get("error")
    }
    api_key = (
        read_secret(target.api_key_secret_ref, run.paths) if target.api_key_secret_ref else None
    )
    transport = None
    if judge.url:  # an external judge: every request through the URL guard
        from tailor.workloads.io.fetch import GuardedTransport

        transport = GuardedTransport(
            allow_private_addresses=judge.allow_private_addresses,
            allow_insecure_http=judge.allow_insecure_http,
        )
    try:
        judge_all(run, items, replies, done, judgments.write, api_key, transport)
    finally:
        judgments.close()
    return judgments.rows


def _interval(outcomes: Sequence[float], seed: int) -> Interval:
    value, low, high = share_interval(outcomes, seed)
    return Interval(value=round(value, 4), low=round(low, 4), high=round(high, 4))


def judged(
    judgments: list[dict[str, Any]],
) -> tuple[dict[tuple[str, str], Verdict], dict[tuple[str, str], dict[str, str | None]]]:
    """The judge's grades as verdicts by (candidate, id), and its comparisons by (candidate,
    id): {order: choice}."""
    grades: dict[tuple[str, str], Verdict] = {}
    comparisons: dict[tuple[str, str], dict[str, str | None]] = {}
    for row in judgments:
        if row.get("error"):
            continue
        key = (row["candidate"], row["id"])
        if row["kind"] == "grade":
            grades[key] = Verdict(row["choice"] == "pass", False, False)
        else:
            comparisons.setdefault(key, {})[row["order"]] = row["choice"]
    return grades, comparisons


def results(
    run: EvaluationRun,
    items: list[Item],
    rows: list[dict[str, Any]],
    judgments: list[dict[str, Any]] | None = None,
) -> tuple[list[CandidateResult], dict[str, str]]:
    """Each candidate's scores, latency, cost and paired test from the answer rows, and its
    outcomes (one character per item: 1 correct, 0 wrong, - not answered)."""
    spec = run.spec
    judge = spec.scoring.type == "judge"
    score = None if judge else scorer(spec.scoring)
    grades, comparisons = judged(judgments or [])
    seed = spec.sample.seed if spec.sample else 42
    metrics = [m for m in METRICS[spec.scoring.type] if m in VERDICT_FLAGS]
    verdicts: dict[str, dict[str, Verdict]] = {}
    out = []
    for name, target in run.targets.items():
        mine = [r for r in rows if r["candidate"] == name]
        answered = {r["id"]: r for r in mine if not r.get("error")}
        by_id = {item.id: item for item in items}
        if score is not None:
            verdicts[name] = {
                i: score(r["reply"], by_id[i]) for i, r in answered.items() if i in by_id
            }
        else:  # an answer the judge did not grade is not scored
            verdicts[name] = {i: grades[name, i] for i in answered if (name, i) in grades}
        ordered = [verdicts[name][item.id] for item in items if item.id in verdicts[name]]
        latencies = [float(r["seconds"]) for r in answered.values()]
        tokens = [
            int(r["completionTokens"]) for r in answered.values() if r.get("completionTokens")
        ]
        walls: dict[str, float] = {}
        for r in mine:  # a pass's wall time is the largest its rows saw
            walls[r["pass"]] = max(walls.get(r["pass"], 0.0), float(r["wall"]))
        n = len(ordered)
        result = CandidateResult(
            name=name,
            scored=n,
            errors=len({item.id for item in items} - set(verdicts[name])),
            latency_p50_seconds=_round(percentile(latencies, 50)),
            latency_p95_seconds=_round(percentile(latencies, 95)),
            completion_tokens=_round(sum(tokens) / len(tokens) if tokens else None),
            cost_per_query=_round(target.devices * sum(walls.values()) / n if n else None),
            devices=target.devices,
        )
        for metric in metrics:
            flag = VERDICT_FLAGS[metric]
            setattr(result, metric, _interval([getattr(v, flag) for v in ordered], seed))
        if judge and spec.baseline and name != spec.baseline:
            pairs = [comparisons.get((name, item.id), {}) for item in items]
            orders = [(p.get("candidate-first"), p.get("baseline-first")) for p in pairs]
            scores = [s for s in (preference(*o) for o in orders) if s is not None]
            if scores:
                result.win_rate = _interval(scores, seed)
                complete = [o for o in orders if None not in o]
                agreeing = sum(agreed(*o) for o in complete)
                result.judge_agreement = _round(agreeing / len(complete))
        out.append(result)
    outcomes = {
        name: "".join(
            "-" if item.id not in mine else "1" if mine[item.id].correct else "0" for item in items
        )
        for name, mine in verdicts.items()
    }
    if spec.baseline:
        base = verdicts[spec.baseline]
        for result in out:
            if result.name == spec.baseline:
                continue
            both = [i for i in verdicts[result.name] if i in base]
            result.p_value = _round(
                mcnemar_exact(
                    [base[i].correct for i in both],
                    [verdicts[result.name][i].correct for i in both],
                )
            )
    return out, outcomes


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def metric_of(result: CandidateResult, metric: str) -> Interval | None:
    """A result's interval for a metric as the API names it (``winRate`` is ``win_rate``)."""
    value = getattr(result, {"winRate": "win_rate"}.get(metric, metric))
    return value if isinstance(value, Interval) else None


def recommend(spec: EvaluationSpec, measured: list[CandidateResult]) -> Recommendation | None:
    """The cheapest candidate whose interval's lower bound meets the target (cost per query,
    then p50 latency), or why none does."""
    if spec.target is None:
        return None
    metric, bar = spec.target.metric, spec.target.min
    scored = [(r, m) for r in measured if (m := metric_of(r, metric)) is not None and r.scored]
    meeting = [(r, m) for r, m in scored if m.low >= bar]
    if meeting:
        best, m = min(
            meeting,
            key=lambda rm: (rm[0].cost_per_query or 0.0, rm[0].latency_p50_seconds or 0.0),
        )
        others = len(meeting) - 1
        return Recommendation(
            candidate=best.name,
            message=f"{best.name}: {metric} {m.value:.3f} [{m.low:.3f}, {m.high:.3f}] meets "
            f"{bar} at {best.cost_per_query} device-seconds per query"
            + (f", the cheapest of {others + 1} that do" if others else ""),
        )
    if not scored:
        return Recommendation(message="no candidate answered a question")
    top, m = max(scored, key=lambda rm: rm[1].value)
    return Recommendation(
        message=f"none meets {metric} >= {bar} at the interval's lower bound: the best is "
        f"{top.name} at {m.value:.3f} [{m.low:.3f}, {m.high:.3f}]"
    )


def chart(spec: EvaluationSpec, measured: list[CandidateResult], path: Path) -> bool:
    """The metric of each candidate against its cost per query, with its interval (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metric = spec.target.metric if spec.target else "accuracy"
    fig, axes = plt.subplots(figsize=(6.5, 4.2))
    for r in measured:
        m = metric_of(r, metric)
        if m is None or r.cost_per_query is None:
            continue
        axes.errorbar(
            [r.cost_per_query],
            [100 * m.value],
            yerr=[[100 * (m.value - m.low)], [100 * (m.high - m.value)]],
            fmt="o",
            capsize=4,
        )
        axes.annotate(r.name, (r.cost_per_query, 100 * m.value), xytext=(6, 4),
                      textcoords="offset points")  # fmt: skip
    if spec.target:
        axes.axhline(100 * spec.target.min, linestyle="--", color="grey", label="target")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("cost per query (device-seconds)")
    axes.set_ylabel(f"{metric}, % (95% interval)")
    axes.set_ylim(0, 100)
    axes.set_title(f"{spec.scoring.type}: {metric} against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def measure(run: EvaluationRun) -> dict[str, Any]:
    """Ask, score and write the report; returns the status patch."""
    spec = run.spec
    items = sample(load_items(spec.questions, run.paths, spec.scoring), spec)
    output = Path(run.output_dir)
    answers = RowLog(output / ANSWERS_FILE)
    progress = make_reporter(run.reporter, run.owner)
    total = len(items) * len(run.targets)
    log.info(
        "%d questions, scoring %s, candidates %s",
        len(items),
        spec.scoring.type,
        ", ".join(run.targets),
    )
    try:
        for name, target in run.targets.items():
            ask_candidate(name, target, items, run, answers, progress, total)
    finally:
        answers.close()
    judgments = None
    if spec.scoring.type == "judge":
        judgments = ask_judge(run, items, answers.rows, output)
    measured, outcomes = results(run, items, answers.rows, judgments)
    if all(r.scored == 0 for r in measured):
        first = next((r.get("error") for r in answers.rows if r.get("error")), "no answer")
        raise RuntimeError(f"every request failed, e.g. {first}")  # the Job retries
    recommendation = recommend(spec, measured)
    for r in measured:
        shown = {k: v for k, v in r.wire().items() if k in ("accuracy", "exact", "hallucination")}
        log.info(
            "%s: scored %d, errors %d, %s, cost %s",
            r.name,
            r.scored,
            r.errors,
            shown,
            r.cost_per_query,
        )
    if recommendation:
        log.info("recommendation: %s", recommendation.message)
    report = {
        "questions": len(items),
        "scoring": spec.scoring.type,
        "candidates": [r.wire() for r in measured],
        **({"recommendation": recommendation.wire()} if recommendation else {}),
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2))
    chart(spec, measured, output / CHART_FILE)
    store = store_of(run.paths)
    if store:
        store.push(str(output))
    ids = hashlib.sha256("\n".join(item.id for item in items).encode()).hexdigest()
    return {
        "questions": len(items),
        "questionsHash": ids,
        **({"outcomes": outcomes} if len(items) <= OUTCOMES_MAX else {}),
        "progress": {"answered": sum(r.scored for r in measured), "total": total},
        "candidates": report["candidates"],
        **({"recommendation": report["recommendation"]} if recommendation else {}),
        "report": {
            "uri": artifact_uri(output, run.paths),
            "sha256": sha256_file(output / REPORT_FILE),
            "sizeBytes": (output / REPORT_FILE).stat().st_size,
        },
    }


def termination_report(patch: dict[str, Any]) -> dict[str, Any]:
    """What the termination message carries: the results without the outcomes (the status
    patch has them), and only the report and recommendation when even that is too long."""
    report = {k: v for k, v in patch.items() if k != "outcomes"}
    if len(json.dumps(report)) > TERMINATION_BYTES:
        report = {k: report[k] for k in ("questions", "questionsHash", "report", "recommendation")
                  if k in report}  # fmt: skip
    return report


def work(run: EvaluationRun) -> None:
    patch = measure(run)
    make_reporter(run.reporter, run.owner).report(patch, final=True)
    summary = patch.get("recommendation", {}).get("message") or f"{patch['questions']} questions"
    # last: the operator calls the Evaluation Succeeded only with this report
    write_termination_message("Evaluated", summary, **termination_report(patch))


def main(argv: list[str] | None = None) -> int:
    return run_main(EvaluationRun, work, argv)


if __name__ == "__main__":
    sys.exit(main())
