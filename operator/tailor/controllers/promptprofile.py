"""PromptProfile controller: validate the template, publish each new revision as an
immutable ConfigMap, keep the last 10 in ``status.history`` (older ConfigMaps deleted)."""

from __future__ import annotations

from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.promptprofile import PromptProfileSpec
from tailor.builders.common import Parent
from tailor.builders.promptprofile import (
    HISTORY,
    build_revision,
    profile_hash,
    revision_config_map_name,
    template_errors,
)
from tailor.controllers.context import Operator, condition, now, syncer

KIND = "PromptProfile"


@syncer(KIND)
def sync_prompt_profile(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
        assert isinstance(spec, PromptProfileSpec)
        errors = template_errors(spec)
    except ManifestError as error:
        errors = error.lines
    if errors:
        if status.get("phase") != "Invalid" or status.get("observedGeneration") != generation:
            op.patch_status(
                body,
                {
                    "phase": "Invalid",
                    "observedGeneration": generation,
                    "conditions": condition(
                        status.get("conditions"),
                        "Ready",
                        False,
                        "InvalidTemplate",
                        "; ".join(errors),
                        generation,
                    ),
                },
            )
        return
    parent = Parent.from_body(body)
    digest = profile_hash(spec)
    if digest == status.get("hash") and status.get("phase") == "Valid":
        return
    history = list(status.get("history") or [])
    known = next((h for h in history if h.get("hash") == digest), None)
    revision = int(status.get("revision") or 0) + 1
    config_map = revision_config_map_name(parent, revision)
    op.runtime.apply(build_revision(spec, parent, revision))
    entry = {"revision": revision, "hash": digest, "configMap": config_map, "time": now()}
    history = [entry, *history][:HISTORY]
    keep = {h["configMap"] for h in history}
    for old in status.get("history") or []:
        if old["configMap"] not in keep:
            op.runtime.delete("v1", "ConfigMap", parent.namespace, old["configMap"])
    message = f"revision {revision} published in ConfigMap {config_map}"
    if known:
        message += f" (same content as revision {known['revision']})"
    op.patch_status(
        body,
        {
            "phase": "Valid",
            "observedGeneration": generation,
            "revision": revision,
            "hash": digest,
            "configMap": config_map,
            "history": history,
            "conditions": condition(
                status.get("conditions"), "Ready", True, "Published", message, generation
            ),
        },
    )
