"""``tailor prompt``: a PromptProfile's revisions from the command line.

``tailor prompt history NAME`` lists the revisions (which one is served, and why),
``tailor prompt diff NAME A B`` shows what changed between two revisions (a unified diff of
their published content), ``tailor prompt rollback NAME REV`` serves revision REV again by
setting ``spec.revisionPin`` (no text is edited back; ``--clear`` removes the pin and
serves the newest again), ``tailor prompt refresh NAME`` asks the operator to read the
profile's inputs again now (its ``fewShotSelection.poolFrom`` ConfigMap: a changed pool is
published as a new revision). The cluster is the current kubeconfig context's; ``-n`` picks
the namespace.
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from tailor.cli.cluster import client


def _profile_path(namespace: str, name: str) -> str:
    from tailor.api import API_VERSION
    from tailor.runtime import rest

    return rest.path(API_VERSION, "promptprofiles", namespace, name)


def _profile(api: Any, namespace: str, name: str) -> dict[str, Any]:
    from tailor.runtime import rest

    return rest.request(api, "GET", _profile_path(namespace, name))


def _revision_text(api: Any, namespace: str, body: dict[str, Any], revision: int) -> str:
    from tailor.runtime import rest

    history = {int(h["revision"]): h for h in (body.get("status") or {}).get("history") or []}
    entry = history.get(revision)
    if entry is None:
        known = ", ".join(str(n) for n in sorted(history)) or "none"
        raise SystemExit(f"revision {revision} is not in status.history (revisions {known})")
    cm = rest.request(api, "GET", rest.path("v1", "configmaps", namespace, entry["configMap"]))
    data = json.loads((cm.get("data") or {}).get("profile.json") or "{}")
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def diff(api: Any, namespace: str, name: str, a: int, b: int) -> str:
    body = _profile(api, namespace, name)
    left = _revision_text(api, namespace, body, a).splitlines(keepends=True)
    right = _revision_text(api, namespace, body, b).splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(left, right, f"{name} revision {a}", f"{name} revision {b}")
    )


def rollback(api: Any, namespace: str, name: str, revision: int | None) -> str:
    from tailor.runtime import rest

    body = _profile(api, namespace, name)
    if revision is not None:
        _revision_text(api, namespace, body, revision)  # it exists, or a clear error
    rest.request(
        api,
        "PATCH",
        _profile_path(namespace, name),
        {"spec": {"revisionPin": revision}},
        content_type=rest.MERGE_PATCH,
    )
    if revision is None:
        return f"promptprofile/{name}: pin removed; the newest revision is served"
    return f"promptprofile/{name}: revision {revision} pinned (spec.revisionPin)"


def refresh(api: Any, namespace: str, name: str) -> str:
    import datetime as dt

    from tailor.runtime import rest

    _profile(api, namespace, name)  # it exists, or a clear error
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    rest.request(
        api,
        "PATCH",
        _profile_path(namespace, name),
        {"metadata": {"annotations": {"tailor.dev/reconcile-requested-at": stamp}}},
        content_type=rest.MERGE_PATCH,
    )
    return f"promptprofile/{name}: reconcile requested at {stamp}"


def history(api: Any, namespace: str, name: str) -> str:
    status = _profile(api, namespace, name).get("status") or {}
    served = status.get("served") or {}
    tests = status.get("tests") or {}
    lines = ["REVISION  PUBLISHED             SERVED       TESTS"]
    for entry in status.get("history") or []:
        number = entry["revision"]
        mark = served.get("reason", "") if served.get("revision") == number else ""
        result = tests.get("summary", "") if tests.get("revision") == number else ""
        lines.append(f"{number:<9} {entry.get('time', ''):<21} {mark:<12} {result}")
    return "\n".join(lines)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "prompt",
        help="`tailor prompt history|diff|rollback`: prompt revisions",
        description=__doc__.split("\n\n")[0],
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", default="default")
    common.add_argument("name", help="the PromptProfile")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("history", parents=[common], help="the revisions, which is served and why")
    d = sub.add_parser("diff", parents=[common], help="what changed between two revisions")
    d.add_argument("a", type=int)
    d.add_argument("b", type=int)
    r = sub.add_parser(
        "rollback", parents=[common], help="serve an older revision (sets spec.revisionPin)"
    )
    r.add_argument("revision", type=int, nargs="?")
    r.add_argument("--clear", action="store_true", help="remove the pin: serve the newest")
    sub.add_parser(
        "refresh", parents=[common], help="read the pool ConfigMap again now (a reconcile)"
    )
    for command in sub.choices.values():
        command.set_defaults(handler=lambda args: prompt_command(args, parser))


def prompt_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run one ``tailor prompt`` command; ``parser`` (``tailor prompt``) reports bad usage."""
    if args.command == "rollback" and (args.revision is None) != args.clear:
        parser.error("give a REVISION, or --clear to remove the pin")
    api = client()
    if args.command == "diff":
        print(diff(api, args.namespace, args.name, args.a, args.b) or "(no difference)", end="")
    elif args.command == "rollback":
        print(rollback(api, args.namespace, args.name, None if args.clear else args.revision))
    elif args.command == "refresh":
        print(refresh(api, args.namespace, args.name))
    else:
        print(history(api, args.namespace, args.name))
    return 0
