"""PromptProfile controller: validate the template, publish each new revision as an
immutable ConfigMap, keep the last 10 in ``status.history`` (older ConfigMaps deleted), run
the revision's test cases as a Job against ``spec.tests.deploymentRef``, and say in
``status.served`` which revision ModelDeployments serve:

- ``spec.revisionPin``: that revision (a rollback), while it is in the history;
- ``spec.tests.gate``: the newest revision whose cases all passed (none yet: deployments
  serve without the profile until one passes: waiting for it would deadlock a deployment
  that is its own test target);
- otherwise the newest.

A revision's content excludes ``tests`` and ``revisionPin``: editing them publishes nothing,
but new cases run again against the current revision. A few-shot pool read from a
ConfigMap (``fewShotSelection.poolFrom``) is part of it: the operator reads the ConfigMap on
every sync (and resync) and publishes its examples inline, so a changed pool is a new
revision, tested and rolled back like any other change.
"""

from __future__ import annotations

import json
from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.common import SecretKeyRef
from tailor.api.promptprofile import ProfileRevisionRef, PromptProfileSpec
from tailor.api.workloads import EvalTarget
from tailor.builders.common import Parent
from tailor.builders.modeldeployment import test_key
from tailor.builders.promptprofile import (
    HISTORY,
    PROFILE_KEY,
    build_prompt_tests,
    build_revision,
    cases_hash,
    profile_hash,
    resolve_pool,
    revision_config_map_name,
    template_errors,
)
from tailor.controllers.children import RECONCILE_REQUEST
from tailor.controllers.context import EXTERNAL_INPUTS, Operator, condition, now, syncer
from tailor.observability.operator import PROMPT_TEST_CASES
from tailor.runtime.base import require_report

KIND = "PromptProfile"


def _reads_a_pool(body: dict[str, Any]) -> bool:
    return bool(((body.get("spec") or {}).get("fewShotSelection") or {}).get("poolFrom"))


# A ConfigMap edit is seen at the next resync, or at once on `tailor prompt refresh`.
EXTERNAL_INPUTS[KIND] = _reads_a_pool


@syncer(KIND)
def sync_prompt_profile(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    handled = {"lastHandledReconcileAt": (meta.get("annotations") or {}).get(RECONCILE_REQUEST)}
    if not handled["lastHandledReconcileAt"]:
        handled = {}
    reason = "InvalidTemplate"
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
        assert isinstance(spec, PromptProfileSpec)
        errors = template_errors(spec)
        if not errors and spec.few_shot_selection and spec.few_shot_selection.pool_from:
            reason = "InvalidPool"
            ref = spec.few_shot_selection.pool_from
            pool_cm = op.runtime.get("v1", "ConfigMap", meta["namespace"], ref.name)
            spec, errors = resolve_pool(spec, pool_cm, meta["namespace"])
    except ManifestError as error:
        errors = error.lines
    if errors:
        message = "; ".join(errors)
        conditions_ = status.get("conditions") or []
        shown: dict[str, Any] = next((c for c in conditions_ if c["type"] == "Ready"), {})
        if (
            status.get("phase") != "Invalid"
            or status.get("observedGeneration") != generation
            or shown.get("message") != message
            or any(status.get(k) != v for k, v in handled.items())
        ):
            op.patch_status(
                body,
                {
                    **handled,
                    "phase": "Invalid",
                    "observedGeneration": generation,
                    "conditions": condition(
                        status.get("conditions"), "Ready", False, reason, message, generation
                    ),
                },
            )
        return
    assert isinstance(spec, PromptProfileSpec)
    parent = Parent.from_body(body)
    conditions = status.get("conditions")
    new: dict[str, Any] = {"phase": "Valid", "observedGeneration": generation, **handled}

    # 1. The revision: a new one when the content changed.
    digest = profile_hash(spec)
    history = list(status.get("history") or [])
    revision = int(status.get("revision") or 0)
    published = ""
    if digest != status.get("hash"):
        known = next((h for h in history if h.get("hash") == digest), None)
        revision += 1
        config_map = revision_config_map_name(parent, revision)
        op.runtime.apply(build_revision(spec, parent, revision))
        history = [{"revision": revision, "hash": digest, "configMap": config_map, "time": now()}]
        history += list(status.get("history") or [])
        published = f"revision {revision} published in ConfigMap {config_map}"
        if known:
            published += f" (same content as revision {known['revision']})"
        new.update(revision=revision, hash=digest, configMap=config_map)

    # 2. Its tests.
    last_passed = status.get("lastPassed")
    tests = tests_verdict(op, spec, parent, revision, status)
    if tests is not None:
        reason, message, passed = tests
        if passed:
            last_passed = max(int(last_passed or 0), revision)
            new["lastPassed"] = last_passed
        conditions = condition(conditions, "TestsPassed", bool(passed), reason, message, generation)

    # 3. What deployments serve.
    served, problem = choose_served(spec, history, revision, last_passed)
    if served is None and problem is None:
        new["served"] = None
    elif served is not None:
        new["served"] = served
    keep = history[:HISTORY]
    if served and all(h["revision"] != served["revision"] for h in keep):
        keep.append(next(h for h in history if h["revision"] == served["revision"]))
    for old in history:
        if old not in keep:
            op.runtime.delete("v1", "ConfigMap", parent.namespace, old["configMap"])
    new["history"] = keep
    ready = served is not None or (problem is None and bool(spec.tests and spec.tests.gate))
    if problem:
        reason, message = "RevisionNotFound", problem
    elif served is None:
        reason, message = (
            "NoRevisionPassed",
            (
                f"no revision has passed its tests yet (tests.gate): ModelDeployments serve "
                f"without the profile until one does; {published or f'revision {revision}'}"
            ),
        )
    else:
        reason = {"Newest": "Published", "Pinned": "Pinned", "LastPassed": "Gated"}[
            served["reason"]
        ]
        message = f"serving revision {served['revision']} ({served['reason']})"
        if published:
            message = f"{published}; {message}"
    new["conditions"] = condition(conditions, "Ready", ready, reason, message, generation)
    if any(status.get(k) != v for k, v in new.items()):
        op.patch_status(body, new)


def choose_served(
    spec: PromptProfileSpec, history: list[dict[str, Any]], revision: int, last_passed: Any
) -> tuple[dict[str, Any] | None, str | None]:
    """(the served revision with its reason, or None; a problem naming the field)."""
    by_number = {int(h["revision"]): h for h in history}
    if spec.revision_pin is not None:
        pinned = by_number.get(spec.revision_pin)
        if pinned is None:
            numbers = ", ".join(str(n) for n in sorted(by_number)) or "none"
            return None, (
                f"spec.revisionPin: revision {spec.revision_pin} is not in status.history "
                f"(revisions {numbers}); pin one of them, or remove revisionPin to serve the "
                "newest"
            )
        return _served(pinned, "Pinned"), None
    if spec.tests and spec.tests.gate:
        passed = by_number.get(int(last_passed or 0))
        return (_served(passed, "LastPassed"), None) if passed else (None, None)
    return _served(by_number[revision], "Newest"), None


def _served(entry: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"revision": entry["revision"], "configMap": entry["configMap"], "reason": reason}


def tests_verdict(
    op: Operator, spec: PromptProfileSpec, parent: Parent, revision: int, status: dict[str, Any]
) -> tuple[str, str, bool | None] | None:
    """(reason, message, passed: True/False, None while unknown) of the current revision's
    tests, starting their Job when needed; None when the profile has no tests."""
    if spec.tests is None:
        return None
    digest = cases_hash(spec) or ""
    results = status.get("tests") or {}
    if results.get("revision") == revision and results.get("casesHash") == digest:
        failing = [c["name"] for c in results.get("cases") or [] if not c.get("passed")]
        return _verdict(revision, results.get("summary") or "", failing)
    ref = spec.tests.deployment_ref.name
    md = op.get("ModelDeployment", parent.namespace, ref)
    if md is None:
        return (
            "DeploymentNotFound",
            f"spec.tests.deploymentRef.name: ModelDeployment {ref} does not exist in "
            f"{parent.namespace}; create it or name one that does",
            False,
        )
    md_status = md.get("status") or {}
    endpoint = md_status.get("endpoint")
    if md_status.get("phase") != "Ready" or not endpoint:
        return ("WaitingForDeployment", f"waiting for ModelDeployment {ref} to be Ready", None)
    adapters = [a.get("name") for a in (md.get("spec") or {}).get("adapters") or []]
    if spec.tests.adapter and spec.tests.adapter not in adapters:
        return (
            "AdapterNotFound",
            f"spec.tests.adapter: ModelDeployment {ref} has no adapter {spec.tests.adapter} "
            f"(it serves {', '.join(adapters) or 'no adapters'})",
            False,
        )
    model = ref if not spec.tests.adapter else f"{ref}/{spec.tests.adapter}"
    auth = ((md.get("spec") or {}).get("auth") or {}).get("apiKeySecretRef")
    workload = build_prompt_tests(
        spec,
        parent,
        op.settings,
        revision,
        EvalTarget(base_url=endpoint, model=model, context="none"),
        SecretKeyRef.model_validate(auth) if auth else None,
        test_key(Parent.from_body(md)),
    )
    state = op.runtime.run_state(parent.namespace, workload.name)
    if state is None:
        op.runtime.prepare_namespace(parent.namespace)
        op.runtime.start(workload)
        return ("Testing", f"running {len(spec.tests.cases)} cases on revision {revision}", None)
    state = require_report(
        state,
        "tests.summary",
        "TestsMissing",
        "the test Job completed but reported no results: see the prompt_tests log",
    )
    if state is None or state.phase not in ("Succeeded", "Failed"):
        return ("Testing", f"running {len(spec.tests.cases)} cases on revision {revision}", None)
    report = (state.result or {}).get("tests") or {} if state.phase == "Succeeded" else {}
    passed = int(report.get("passed") or 0)
    for result, count in (("passed", passed), ("failed", len(spec.tests.cases) - passed)):
        PROMPT_TEST_CASES.labels(parent.namespace, parent.name, str(revision), result).set(count)
    if state.phase == "Failed":  # (no report counts every case as failed)
        return (state.reason or "TestsFailed", f"the test Job failed: {state.message}", False)
    return _verdict(revision, report.get("summary", ""), list(report.get("failing") or []))


def _verdict(revision: int, summary: str, failing: list[str]) -> tuple[str, str, bool]:
    if failing:
        return (
            "TestsFailed",
            f"revision {revision}: {summary} cases passed; failing: {', '.join(failing)}",
            False,
        )
    return ("TestsPassed", f"revision {revision}: {summary} cases passed", True)


def profile_revision(
    op: Operator, ref: ProfileRevisionRef, field: str, namespace: str
) -> tuple[tuple[int, dict[str, Any]], tuple[str, str] | None]:
    """((revision, its rendered profile), or the problem naming the field) of the
    ``promptProfileRef`` under ``field`` (an Evaluation's candidate, a rollout's variant):
    the named revision from the profile's history, else the served one."""
    none: tuple[int, dict[str, Any]] = (0, {})
    pp = op.get("PromptProfile", namespace, ref.name)
    if pp is None:
        return none, (
            "PromptProfileNotFound",
            f"{field}.promptProfileRef.name: PromptProfile {ref.name} does not exist in "
            f"{namespace}; create it or name one that does",
        )
    status = pp.get("status") or {}
    wanted = ref.revision or (status.get("served") or {}).get("revision")
    history = {int(h["revision"]): h for h in status.get("history") or []}
    if wanted is None:
        return none, ("WaitingForPromptProfile", f"waiting for PromptProfile {ref.name} to serve")
    if int(wanted) not in history:
        known = ", ".join(str(n) for n in sorted(history)) or "none"
        return none, (
            "RevisionNotFound",
            f"{field}.promptProfileRef.revision: PromptProfile {ref.name} has no revision "
            f"{wanted} in its history (revisions {known})",
        )
    config_map = op.runtime.get("v1", "ConfigMap", namespace, history[int(wanted)]["configMap"])
    text = ((config_map or {}).get("data") or {}).get(PROFILE_KEY)
    if not text:
        return none, ("RevisionNotFound", f"{field}.promptProfileRef: revision {wanted} is gone")
    return (int(wanted), json.loads(text)), None
