"""``tailor eval apibench --corpus API.jsonl --questions EVAL.json --answers A.jsonl``:
score a file of answers the way the RAFT paper scores APIBench (Gorilla's AST evaluation,
``tailor.workloads.evaluation.apibench``), with exact match and hallucination rate beside
it; a table of percentages, or the totals as JSON with ``--json``. A bad input line is one
error naming the file and the line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
