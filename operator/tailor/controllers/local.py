"""With the local runtime there are no Job, Pod or Deployment events to react to: these
timers poll each unfinished resource's processes instead (every 2 seconds), through the
same ``sync`` the events call in a cluster."""

from __future__ import annotations

from typing import Any

import kopf

from tailor.api import GROUP, KINDS, VERSION
from tailor.controllers.context import operator

TERMINAL = {"Succeeded", "Failed", "Invalid", "Valid"}


def _local_and_unfinished(status: dict[str, Any], **_: Any) -> bool:
    if operator().settings.runtime != "local":
        return False
    status = status or {}
    testing = any(  # a PromptProfile whose test Job is running
        c.get("type") == "TestsPassed" and c.get("reason") == "Testing"
        for c in status.get("conditions") or []
    )
    gating = status.get("phase") == "Succeeded" and (status.get("evaluation") or {}).get(
        "phase"
    ) not in (None, "Passed", "Failed")  # a FineTuneJob's evaluation gate under way
    return testing or gating or status.get("phase") not in TERMINAL


def _poll(kind: str) -> None:
    @kopf.timer(
        GROUP,
        VERSION,
        KINDS[kind].plural,
        id=f"local-{kind.lower()}",
        interval=2,
        idle=0,
        when=_local_and_unfinished,
    )
    def poll(namespace: str, name: str, **_: Any) -> None:
        operator().enqueue(kind, namespace, name)


for _kind in KINDS:
    _poll(_kind)
