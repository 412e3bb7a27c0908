"""``tailor rollout``: a ModelDeployment's rollout (``spec.rollout``) for the human in the
loop.

- ``tailor rollout status NAME [--watch]``: the step, weight and phase, each variant's
  numbers over the step and each check with its limit and verdict (``--watch``: again on
  every change until the rollout ends);
- ``tailor rollout promote NAME``: the candidate answers all of the stable's traffic now;
- ``tailor rollout abort NAME``: the stable answers everything now.

Promote and abort set the annotation ``tailor.dev/rollout-action: <action>:<rollout id>``
on the ModelDeployment (so an action meant for one rollout never applies to the next);
the operator acts on it at its next look and records why in ``status.rollout``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from tailor.cli.cluster import client


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = commands.add_parser("rollout", help="a ModelDeployment's rollout: status, act")
    sub = rollout.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="the rollout's step, numbers and checks")
    status.add_argument("name", help="the ModelDeployment")
    status.add_argument("-n", "--namespace", default="default")
    status.add_argument("--watch", action="store_true", help="refresh until it ends")
    status.set_defaults(handler=status_command)
    for action, text in (
        ("promote", "the candidate answers all of the stable's traffic now"),
        ("abort", "the stable answers everything now"),
    ):
        act = sub.add_parser(action, help=text)
        act.add_argument("name", help="the ModelDeployment")
        act.add_argument("-n", "--namespace", default="default")
        act.set_defaults(handler=action_command, action=action)


def _path(namespace: str, name: str) -> str:
    from tailor.api import API_VERSION
    from tailor.runtime import rest

    return rest.path(API_VERSION, "modeldeployments", namespace, name)


def table(body: dict[str, Any]) -> str:
    """A rollout's status as text."""
    name = body["metadata"]["name"]
    rollout = (body.get("spec") or {}).get("rollout")
    state = (body.get("status") or {}).get("rollout")
    if not rollout:
        return f"ModelDeployment {name} has no spec.rollout"
    if not state:
        return f"ModelDeployment {name}: rollout not started yet"
    mode = rollout.get("mode", "canary")
    steps = len(rollout.get("steps") or [])
    step = min(state["step"] + 1, steps)
    lines = [
        f"{name}: {mode} rollout {state['id']}: {state['phase']}, step {step}/{steps}, "
        f"weight {state['weight']}%",
        f"  {state.get('message', '')}",
        f"  {'variant':10} {'adapter':16} {'requests':>8} {'errors':>6} {'rated':>6} "
        f"{'satisf.':>7} {'p95 s':>7} {'tok/q':>7} {'won':>6}",
    ]
    for v in state.get("variants") or []:
        lines.append(
            f"  {v['name']:10} {_variant(v):16} {v.get('requests', 0):>8} "
            f"{v.get('errors', 0):>6} {v.get('rated', 0):>6} {_num(v.get('satisfaction')):>7} "
            f"{_num(v.get('p95Latency')):>7} {_num(v.get('costPerQuery'), 1):>7} "
            f"{_num(v.get('winRate')):>6}"
        )
    for c in state.get("checks") or []:
        spread = c.get("interval")
        shown = f" interval [{_num(spread[0])}, {_num(spread[1])}]" if spread else ""
        lines.append(
            f"  check {c['metric']:13} candidate {_num(c.get('candidate'))} stable "
            f"{_num(c.get('stable'))} limit {_num(c.get('limit'))}{shown} samples "
            f"{c['samples']}: {c['verdict']}"
        )
    return "\n".join(lines)


def _variant(measure: dict[str, Any]) -> str:
    """What a variant answers with: its adapter, profile and index version."""
    parts = [measure.get("adapter") or "(base)"]
    if measure.get("promptProfile"):
        parts.append(f"pp:{measure['promptProfile']}")
    if measure.get("knowledgeBaseVersion"):
        parts.append(f"kb:v{measure['knowledgeBaseVersion']}")
    return " ".join(parts)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_command(args: argparse.Namespace) -> int:
    from tailor.controllers.rollout import ENDED
    from tailor.runtime import rest

    api, shown = client(), ""
    while True:
        body = rest.request(api, "GET", _path(args.namespace, args.name))
        text = table(body)
        if text != shown:
            print(text + "\n", flush=True)
            shown = text
        phase = ((body.get("status") or {}).get("rollout") or {}).get("phase")
        if not args.watch or phase in ENDED:
            return 1 if phase in ("RolledBack", "Aborted") and args.watch else 0
        time.sleep(2)


def action_command(args: argparse.Namespace) -> int:
    from tailor.controllers.rollout import ACTION_ANNOTATION, ENDED
    from tailor.runtime import rest

    api = client()
    body = rest.request(api, "GET", _path(args.namespace, args.name))
    state = (body.get("status") or {}).get("rollout")
    if not state:
        raise SystemExit(f"ModelDeployment {args.name} has no rollout in progress")
    if state["phase"] in ENDED:
        raise SystemExit(f"the rollout {state['id']} has ended already ({state['phase']})")
    patch = {"metadata": {"annotations": {ACTION_ANNOTATION: f"{args.action}:{state['id']}"}}}
    rest.request(
        api,
        "PATCH",
        _path(args.namespace, args.name),
        patch,
        content_type="application/merge-patch+json",
    )
    print(f"{args.action} of rollout {state['id']} requested; the operator acts at its next look")
    return 0
