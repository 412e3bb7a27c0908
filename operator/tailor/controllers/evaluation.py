"""Evaluation controller: resolve each candidate to its ModelDeployment's endpoint, run the
evaluation Job once, and copy its results into the status.

- A candidate whose deployment does not exist, is not Ready, or does not serve the named
  adapter keeps the Evaluation Pending with a ``Ready`` condition naming the field
  (``spec.candidates[i].deploymentRef.name`` or ``.adapter``); it starts when every
  candidate is servable (a deployment's change of phase syncs its Evaluations).
- Once the Job exists, the candidates are not looked up again: the Job's spec holds the
  endpoints it was started with, and its pods (restarted after a failure) continue the
  answers file.
- The Job's termination message carries the results; a Job that exits 0 without one is a
  failure (``ReportMissing``). Succeeded and Failed are final.
"""

from __future__ import annotations

from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.common import SecretKeyRef
from tailor.api.evaluation import EvaluationSpec
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import CandidateTarget
from tailor.builders.common import Parent
from tailor.builders.evaluation import build_evaluation, job_name
from tailor.builders.modeldeployment import test_key
from tailor.controllers.context import Operator, condition, syncer
from tailor.controllers.promptprofile import profile_revision
from tailor.observability.operator import EVALUATION_COST, EVALUATION_SCORES
from tailor.runtime.base import require_report

KIND = "Evaluation"
RESULT_FIELDS = ("questions", "questionsHash", "progress", "candidates", "recommendation", "report")
"""What the workload's termination message may hold and the status takes (the outcomes
come in the workload's own status patch only: the message has 4 KB)."""


def devices(spec: ModelDeploymentSpec, status: dict[str, Any]) -> float:
    """Devices a deployment holds: its replicas times GPUs per replica, or CPU cores (its
    request; one when unset) on CPU."""
    replicas = int(status.get("readyReplicas") or status.get("replicas") or spec.replicas or 1)
    if spec.resources.gpus:
        return float(replicas * spec.resources.gpus)
    cpu = str(spec.resources.cpu or "1")
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return float(replicas * cores)


def resolve(
    op: Operator, spec: EvaluationSpec, namespace: str
) -> tuple[dict[str, CandidateTarget], tuple[str, str] | None]:
    """(targets by candidate, or the (reason, message) of the first that cannot be asked)."""
    targets: dict[str, CandidateTarget] = {}
    for i, candidate in enumerate(spec.candidates):
        ref = candidate.deployment_ref.name
        field = f"spec.candidates[{i}]"
        md = op.get("ModelDeployment", namespace, ref)
        if md is None:
            return {}, (
                "DeploymentNotFound",
                f"{field}.deploymentRef.name: ModelDeployment {ref} does not exist in "
                f"{namespace}; create it or name one that does",
            )
        md_status = md.get("status") or {}
        if md_status.get("phase") != "Ready" or not md_status.get("endpoint"):
            return {}, (
                "WaitingForDeployment",
                f"{field} ({candidate.name}): waiting for ModelDeployment {ref} to be Ready "
                f"(it is {md_status.get('phase') or 'new'})",
            )
        try:
            md_spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValueError:
            return {}, ("DeploymentInvalid", f"{field}: ModelDeployment {ref} is invalid")
        adapters = [a.name for a in md_spec.adapters]
        if candidate.adapter and candidate.adapter not in adapters:
            return {}, (
                "AdapterNotFound",
                f"{field}.adapter: ModelDeployment {ref} has no adapter {candidate.adapter} "
                f"(it serves {', '.join(adapters) or 'no adapters'})",
            )
        profile: dict[str, Any] = {}
        if candidate.prompt_profile_ref:
            found, problem = profile_revision(op, candidate.prompt_profile_ref, field, namespace)
            if problem:
                return {}, problem
            profile = {"prompt_profile": found[1], "prompt_profile_revision": found[0]}
        auth = md_spec.auth.api_key_secret_ref if md_spec.auth else None
        targets[candidate.name] = CandidateTarget(
            base_url=md_status["endpoint"],
            model=f"{ref}/{candidate.adapter}" if candidate.adapter else ref,
            context="none",
            retrieval=candidate.retrieval,
            devices=devices(md_spec, md_status),
            api_key_secret_ref=SecretKeyRef.model_validate(auth.wire()) if auth else None,
            # the deployment's test key: brings the profile, reaches a gated adapter
            test_key_secret_ref=test_key(Parent.from_body(md)),
            **profile,
        )
    return targets, None


def resolve_judge(
    op: Operator, spec: EvaluationSpec, namespace: str
) -> tuple[CandidateTarget | None, tuple[str, str] | None]:
    """scoring.judge's endpoint: a ModelDeployment of this namespace once Ready, or its URL
    (which the workload asks through the URL guard)."""
    judge = spec.scoring.judge
    if judge is None:
        return None, None
    if judge.url:
        return (
            CandidateTarget(
                base_url=judge.url,
                model=judge.model or "",
                context="none",
                api_key_secret_ref=judge.api_key_secret_ref,
            ),
            None,
        )
    assert judge.deployment_ref is not None
    ref = judge.deployment_ref.name
    md = op.get("ModelDeployment", namespace, ref)
    md_status = (md or {}).get("status") or {}
    if md is None:
        return None, (
            "DeploymentNotFound",
            f"spec.scoring.judge.deploymentRef.name: ModelDeployment {ref} does not exist in "
            f"{namespace}; create it or name one that does",
        )
    if md_status.get("phase") != "Ready" or not md_status.get("endpoint"):
        return None, ("WaitingForDeployment", f"waiting for the judge, ModelDeployment {ref}")
    auth = ((md.get("spec") or {}).get("auth") or {}).get("apiKeySecretRef")
    return (
        CandidateTarget(
            base_url=md_status["endpoint"],
            model=judge.model or ref,
            context="none",
            api_key_secret_ref=SecretKeyRef.model_validate(auth) if auth else None,
        ),
        None,
    )


def export_results(namespace: str, name: str, status: dict[str, Any]) -> None:
    """A finished Evaluation's results as operator metrics (the dashboard's Evaluations
    row); set again when a restarted operator first sees it."""
    for result in status.get("candidates") or []:
        for metric in ("accuracy", "exact", "hallucination"):
            for bound in ("value", "low", "high"):
                value = (result.get(metric) or {}).get(bound)
                if value is not None:
                    EVALUATION_SCORES.labels(namespace, name, result["name"], metric, bound).set(
                        value
                    )
        if result.get("costPerQuery") is not None:
            EVALUATION_COST.labels(namespace, name, result["name"]).set(result["costPerQuery"])


@syncer(KIND)
def sync_evaluation(op: Operator, body: dict[str, Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    if status.get("phase") == "Succeeded":
        export_results(meta["namespace"], meta["name"], status)
    if status.get("phase") in ("Succeeded", "Failed"):
        return  # one-shot: the spec cannot change (CEL), nothing runs again
    conditions = status.get("conditions")
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
        assert isinstance(spec, EvaluationSpec)
    except ManifestError as error:
        message = "; ".join(error.lines)
        op.patch_status(
            body,
            {
                "phase": "Failed",
                "observedGeneration": generation,
                "conditions": condition(conditions, "Ready", False, "InvalidSpec", message),
            },
        )
        return
    parent = Parent.from_body(body)
    new: dict[str, Any] = {"observedGeneration": generation}
    state = op.runtime.run_state(parent.namespace, job_name(parent))
    if state is None:
        targets, problem = resolve(op, spec, parent.namespace)
        judge, judge_problem = resolve_judge(op, spec, parent.namespace)
        problem = problem or judge_problem
        if problem:
            reason, message = problem
            new.update(
                phase="Pending",
                conditions=condition(conditions, "Ready", False, reason, message, generation),
            )
        else:
            op.runtime.prepare_namespace(parent.namespace)
            op.runtime.start(build_evaluation(spec, parent, op.settings, targets, judge))
            names = ", ".join(targets)
            new.update(
                phase="Running",
                conditions=condition(
                    conditions, "Ready", True, "Started", f"asking {names}", generation
                ),
            )
    else:
        state = require_report(
            state,
            "report.uri",
            "ReportMissing",
            "the evaluation Job completed but reported no results: see its log",
        )
        assert state is not None
        if state.phase == "Succeeded":
            result = state.result or {}
            recommendation = (result.get("recommendation") or {}).get("message")
            message = recommendation or f"{result.get('questions')} questions asked"
            export_results(parent.namespace, parent.name, result)
            new.update(
                {k: result[k] for k in RESULT_FIELDS if k in result},
                phase="Succeeded",
                conditions=condition(
                    conditions, "Succeeded", True, "Evaluated", message, generation
                ),
            )
        elif state.phase == "Failed":
            new.update(
                phase="Failed",
                conditions=condition(
                    conditions,
                    "Succeeded",
                    False,
                    state.reason or "EvaluationFailed",
                    f"the evaluation Job failed: {state.message}",
                    generation,
                ),
            )
        else:
            new["phase"] = "Running"
    if any(status.get(k) != v for k, v in new.items()):
        op.patch_status(body, new)
