"""``tailor eval``: Evaluations from the command line, and scoring a file of answers.

- ``tailor eval run NAME --questions configmap://CM/KEY --scoring apibench:torchhub
  --candidate rag=api-assistant --candidate lora-rag=api-assistant/torchhub ...``: create an
  Evaluation from flags (a candidate ``NAME=DEPLOYMENT[/ADAPTER][:noretrieval]``; checked
  as ``kubectl apply`` would check it) and follow it live until it finishes;
- ``tailor eval show NAME [--watch]``: its status as a table (value and 95% interval of
  each metric, latency, cost, p-value, the recommendation);
- ``tailor eval compare A B``: two finished Evaluations of the same questions (the same
  ``questionsHash``), paired per candidate: each one's accuracy on the questions both
  answered, the difference and the exact McNemar p-value;
- ``tailor eval apibench --corpus API.jsonl --questions EVAL.json --answers A.jsonl``:
  score a file of answers the way the RAFT paper scores APIBench (Gorilla's AST evaluation,
  ``tailor.workloads.evaluation.apibench``), with exact match and hallucination rate beside
  it; a table of percentages, or the totals as JSON with ``--json``. A bad input line is
  one error naming the file and the line, exit 2.

The cluster is the current kubeconfig context's; ``-n`` picks the namespace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tailor.cli.cluster import client


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eval", help="`tailor eval apibench`: score answers as the RAFT paper does"
    )
    sub = evaluate.add_subparsers(dest="command", required=True)
    apibench = sub.add_parser(
        "apibench",
        help="score answers as the RAFT paper scores APIBench",
        description="Score answers the way the RAFT paper scores APIBench (Gorilla's AST "
        "evaluation), with exact match and hallucination rate beside it.",
    )
    apibench.add_argument("--corpus", type=Path, required=True, help="the *_api.jsonl corpus")
    apibench.add_argument("--questions", type=Path, required=True, help="the *_eval.json file")
    apibench.add_argument(
        "--answers", type=Path, required=True, help='JSON lines {"text": reply}, question order'
    )
    apibench.add_argument("--json", action="store_true", help="print the totals as JSON")
    apibench.set_defaults(handler=score_apibench)
    show = sub.add_parser("show", help="an Evaluation's results as a table")
    show.add_argument("name")
    show.add_argument("-n", "--namespace", default="default")
    show.add_argument("--watch", action="store_true", help="refresh until it finishes")
    show.set_defaults(handler=show_command)
    run = sub.add_parser("run", help="create an Evaluation from flags and follow it")
    run.add_argument("name")
    run.add_argument("-n", "--namespace", default="default")
    run.add_argument(
        "--questions",
        required=True,
        help="configmap://NAME/KEY, pvc://CLAIM/PATH or s3://BUCKET/KEY",
    )
    run.add_argument(
        "--scoring",
        required=True,
        help="exact, contains, regex, or apibench:CORPUS (torchhub, huggingface)",
    )
    run.add_argument(
        "--candidate",
        action="append",
        required=True,
        help="NAME=DEPLOYMENT[/ADAPTER][:noretrieval] (repeat for each)",
    )
    run.add_argument("--baseline", help="the candidate the others are compared with")
    run.add_argument("--target", help="METRIC=MIN, e.g. accuracy=0.4")
    run.add_argument("--sample", type=int, help="ask a seeded sample of this many")
    run.add_argument("--concurrency", type=int, default=8)
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--no-follow", action="store_true", help="create it and return")
    run.set_defaults(handler=run_command)
    compare = sub.add_parser(
        "compare", help="two Evaluations of the same questions, paired per candidate"
    )
    compare.add_argument("a", help="the first Evaluation")
    compare.add_argument("b", help="the second Evaluation")
    compare.add_argument("-n", "--namespace", default="default")
    compare.add_argument(
        "--candidates",
        help="A_CANDIDATE=B_CANDIDATE to compare two differently named candidates "
        "(default: every name the two share)",
    )
    compare.set_defaults(handler=compare_command)


def score_apibench(args: argparse.Namespace) -> int:
    from tailor.workloads.errors import WorkloadError
    from tailor.workloads.evaluation.apibench import score_files

    try:
        totals = score_files(args.corpus, args.questions, args.answers)
    except (WorkloadError, OSError) as exc:
        print(f"tailor eval apibench: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(totals))
    else:
        print(f"{totals['n']} answers")
        for key, label in (
            ("accuracy", "accuracy (paper: a real API of the question's domain)"),
            ("exact", "exact (the gold API)"),
            ("hallucination", "hallucination (no corpus API)"),
        ):
            print(f"  {label:56} {100 * totals[key]:6.2f}%")
    return 0


# --- Evaluations on a cluster ------------------------------------------------------------


def evaluation_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """The Evaluation the ``run`` flags describe (checked as the API server would)."""
    from tailor.api import ManifestError, parse

    if args.questions.startswith("configmap://"):
        name, _, key = args.questions.removeprefix("configmap://").partition("/")
        questions: dict[str, Any] = {"configMap": {"name": name, "key": key}}
    else:
        questions = {"uri": args.questions}
    kind, _, corpus = args.scoring.partition(":")
    scoring: dict[str, Any] = {"type": kind, **({"corpus": corpus} if corpus else {})}
    candidates = []
    for text in args.candidate:
        name, equals, where = text.partition("=")
        where, _, option = where.partition(":")
        deployment, _, adapter = where.partition("/")
        if not equals or not deployment or option not in ("", "noretrieval"):
            raise SystemExit(f"--candidate {text!r}: write NAME=DEPLOYMENT[/ADAPTER][:noretrieval]")
        candidates.append(
            {
                "name": name,
                "deploymentRef": {"name": deployment},
                **({"adapter": adapter} if adapter else {}),
                **({"retrieval": False} if option else {}),
            }
        )
    spec: dict[str, Any] = {
        "questions": questions,
        "scoring": scoring,
        "candidates": candidates,
        "concurrency": args.concurrency,
        "maxTokens": args.max_tokens,
    }
    if args.baseline:
        spec["baseline"] = args.baseline
    if args.target:
        metric, _, bar = args.target.partition("=")
        try:
            spec["target"] = {"metric": metric, "min": float(bar)}
        except ValueError:
            raise SystemExit(
                f"--target {args.target!r}: write METRIC=MIN, e.g. accuracy=0.4"
            ) from None
    if args.sample:
        spec["sample"] = {"size": args.sample}
    manifest = {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": args.name, "namespace": args.namespace},
        "spec": spec,
    }
    try:
        parse(manifest)
    except ManifestError as error:
        raise SystemExit("tailor eval run: " + "; ".join(error.lines)) from None
    return manifest


def _percent(metric: dict[str, Any] | None) -> str:
    if not metric:
        return "-"
    return f"{100 * metric['value']:.1f} [{100 * metric['low']:.1f}, {100 * metric['high']:.1f}]"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _p_value(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.0001" if value < 0.0001 else f"{value:.4f}"


def table(body: dict[str, Any]) -> str:
    """An Evaluation's status as text: a row per candidate, then the recommendation."""
    status = body.get("status") or {}
    name = body["metadata"]["name"]
    lines = [f"Evaluation {name}: {status.get('phase') or 'new'}"]
    progress = status.get("progress") or {}
    if status.get("phase") == "Running" and progress:
        lines.append(
            f"  {progress.get('answered', 0)}/{progress.get('total', '?')} answered"
            + (f", asking {progress['candidate']}" if progress.get("candidate") else "")
        )
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True" or status.get("phase") in ("Failed", "Pending"):
            lines.append(f"  {cond['type']} {cond['status']} {cond['reason']}: {cond['message']}")
    rows = status.get("candidates") or []
    if rows:
        baseline = (body.get("spec") or {}).get("baseline")
        header = ("candidate", "scored", "err", "accuracy % [95%]", "exact %", "halluc. %",
                  "p50 s", "p95 s", "cost dev-s/q", "p vs " + (baseline or "-"))  # fmt: skip
        cells = [header]
        for r in rows:
            cells.append(
                (
                    r["name"],
                    str(r["scored"]),
                    str(r.get("errors", 0)),
                    _percent(r.get("accuracy")),
                    _percent(r.get("exact")),
                    _percent(r.get("hallucination")),
                    _number(r.get("latencyP50Seconds")),
                    _number(r.get("latencyP95Seconds")),
                    _number(r.get("costPerQuery")),
                    "baseline" if r["name"] == baseline else _p_value(r.get("pValue")),
                )
            )
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        for row in cells:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    recommendation = status.get("recommendation")
    if recommendation:
        lines.append(f"recommendation: {recommendation['message']}")
    report = (status.get("report") or {}).get("uri")
    if report:
        lines.append(f"report: {report}")
    return "\n".join(lines)


def _path(namespace: str, name: str = "") -> str:
    from tailor.api import API_VERSION
    from tailor.runtime import rest

    return rest.path(API_VERSION, "evaluations", namespace, name)


def follow(api: Any, namespace: str, name: str, watch: bool) -> int:
    """Print the table, and with ``watch`` again on every change until it finishes; exit
    status 0 when it succeeded (or is still running without ``watch``), 1 when it failed."""
    from tailor.runtime import rest

    shown = ""
    while True:
        body = rest.request(api, "GET", _path(namespace, name))
        text = table(body)
        if text != shown:
            print(text + "\n", flush=True)
            shown = text
        phase = (body.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") or not watch:
            return 1 if phase == "Failed" else 0
        time.sleep(2)


def show_command(args: argparse.Namespace) -> int:
    return follow(client(), args.namespace, args.name, args.watch)


def run_command(args: argparse.Namespace) -> int:
    from tailor.runtime import rest

    manifest = evaluation_manifest(args)
    api = client()
    rest.request(api, "POST", _path(args.namespace), manifest)
    print(f"evaluation.tailor.dev/{args.name} created", flush=True)
    return 0 if args.no_follow else follow(api, args.namespace, args.name, watch=True)


def compare(a: dict[str, Any], b: dict[str, Any], pairs: list[tuple[str, str]] | None) -> str:
    """The paired comparison of two finished Evaluations, as text; SystemExit naming what
    makes them incomparable."""
    from tailor.workloads.evaluation.stats import mcnemar_exact

    names = (a["metadata"]["name"], b["metadata"]["name"])
    sa, sb = a.get("status") or {}, b.get("status") or {}
    for name, status in zip(names, (sa, sb), strict=True):
        if status.get("phase") != "Succeeded":
            raise SystemExit(f"Evaluation {name} has not succeeded ({status.get('phase')})")
        if not status.get("outcomes"):
            raise SystemExit(f"Evaluation {name} keeps no outcomes (more than 2000 questions?)")
    if sa.get("questionsHash") != sb.get("questionsHash"):
        raise SystemExit(
            f"{names[0]} and {names[1]} asked different questions (questionsHash differs): "
            "a paired comparison needs the same questions and sample"
        )
    kinds = [((x.get("spec") or {}).get("scoring") or {}).get("type") for x in (a, b)]
    if kinds[0] != kinds[1]:
        raise SystemExit(f"{names[0]} scores with {kinds[0]}, {names[1]} with {kinds[1]}")
    oa, ob = sa["outcomes"], sb["outcomes"]
    pairs = pairs or [(c, c) for c in oa if c in ob]
    if not pairs:
        raise SystemExit(f"{names[0]} and {names[1]} share no candidate name; use --candidates")
    lines = [f"{names[0]} vs {names[1]}: {sa.get('questions')} questions, paired ({kinds[0]})"]
    lines.append(f"  {'candidate':28} {'both':>5} {'A %':>6} {'B %':>6} {'B-A':>6} {'p':>7}")
    for left, right in pairs:
        if left not in oa or right not in ob:
            raise SystemExit(f"no candidate {left!r} in {names[0]} or {right!r} in {names[1]}")
        both = [(x, y) for x, y in zip(oa[left], ob[right], strict=True) if "-" not in (x, y)]
        if not both:
            lines.append(f"  {left + ' / ' + right:28} {0:>5}  no question answered by both")
            continue
        xs, ys = [x == "1" for x, _ in both], [y == "1" for _, y in both]
        acc_a, acc_b = 100 * sum(xs) / len(both), 100 * sum(ys) / len(both)
        label = left if left == right else f"{left} / {right}"
        lines.append(
            f"  {label:28} {len(both):>5} {acc_a:6.1f} {acc_b:6.1f} {acc_b - acc_a:+6.1f} "
            f"{mcnemar_exact(xs, ys):7.4f}"
        )
    return "\n".join(lines)


def compare_command(args: argparse.Namespace) -> int:
    from tailor.runtime import rest

    pairs = None
    if args.candidates:
        left, equals, right = args.candidates.partition("=")
        if not equals:
            raise SystemExit("--candidates: write A_CANDIDATE=B_CANDIDATE")
        pairs = [(left, right)]
    api = client()
    a, b = (rest.request(api, "GET", _path(args.namespace, n)) for n in (args.a, args.b))
    print(compare(a, b, pairs))
    return 0
