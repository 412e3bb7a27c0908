"""RAFTJob controller: GeneratingData (a Job), Training (a child FineTuneJob), Evaluating
(a child ModelDeployment serving base + RAFT adapter, then an evaluation Job), Succeeded.
A stage's Job counts as done only with its workload's report (the dataset's, the scores'
checksum) in its termination message; a Job that completes without one fails the RAFTJob
(DatasetMissing, EvaluationMissing).

Every stage is derived from the children that exist, so a restarted operator continues
where the previous one stopped; ``status.stage`` shows it to users.
"""

from __future__ import annotations

from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.raftjob import RAFTJobSpec
from tailor.api.workloads import EvalTarget
from tailor.builders.common import Parent
from tailor.builders.knowledgebase import retriever_config
from tailor.builders.raftjob import (
    build_child_fine_tune,
    build_data_stage,
    build_eval_deployment,
    build_evaluation_stage,
    child_fine_tune_name,
    eval_deployment_name,
)
from tailor.controllers.context import Operator, condition, syncer
from tailor.runtime.base import require_report

KIND = "RAFTJob"


def _status(
    body: dict[str, Any], phase: str, stage: str, reason: str, message: str, **extra: Any
) -> dict[str, Any]:
    status = body.get("status") or {}
    generation = body["metadata"].get("generation")
    return {
        "phase": phase,
        "stage": stage,
        "observedGeneration": generation,
        "conditions": condition(
            status.get("conditions"), "Ready", phase == "Succeeded", reason, message, generation
        ),
        **extra,
    }


@syncer(KIND)
def sync_raft_job(op: Operator, body: dict[str, Any]) -> None:
    status = body.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") and status.get("stage") in (
        "Succeeded",
        "Failed",
    ):
        return
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        op.patch_status(
            body, _status(body, "Failed", "Failed", "InvalidSpec", "; ".join(error.lines))
        )
        return
    assert isinstance(spec, RAFTJobSpec)
    parent = Parent.from_body(body)
    kb = op.get("KnowledgeBase", parent.namespace, spec.knowledge_base_ref.name)
    if kb is None or (kb.get("status") or {}).get("phase") != "Ready":
        phase = ((kb or {}).get("status") or {}).get("phase") or (
            "not found" if kb is None else "Pending"
        )
        message = f"waiting for KnowledgeBase {spec.knowledge_base_ref.name} ({phase})"
        op.patch_status(
            body, _status(body, "Pending", "GeneratingData", "WaitingForKnowledgeBase", message)
        )
        return
    kb_spec = parse_spec(KINDS["KnowledgeBase"], kb["spec"])
    assert isinstance(kb_spec, KnowledgeBaseSpec)
    retriever = retriever_config(kb_spec, Parent.from_body(kb), op.settings)
    settings = op.settings.for_store(spec.output.store)
    problem = settings.store_problem("spec.output.store")
    if problem:
        op.patch_status(body, _status(body, "Failed", "Failed", "StoreNotConfigured", problem))
        return
    op.runtime.prepare_namespace(parent.namespace)

    # Stage 1: training data.
    teacher_url = None
    if spec.questions.generate:
        teacher = spec.questions.generate.teacher
        if teacher.deployment_ref:
            md = op.get("ModelDeployment", parent.namespace, teacher.deployment_ref.name)
            teacher_url = ((md or {}).get("status") or {}).get("endpoint")
            if not teacher_url:
                op.patch_status(
                    body,
                    _status(
                        body,
                        "Pending",
                        "GeneratingData",
                        "WaitingForTeacher",
                        f"waiting for ModelDeployment {teacher.deployment_ref.name}",
                    ),
                )
                return
        else:
            teacher_url = teacher.url
    data = build_data_stage(spec, parent, settings, retriever, teacher_url)
    state = op.runtime.run_state(parent.namespace, data.name)
    if state is None:
        op.runtime.start(data)
        state = op.runtime.run_state(parent.namespace, data.name)
    state = require_report(
        state,
        "dataset.artifact.sha256",
        "DatasetMissing",
        "the data Job completed but reported no dataset (manifest.json with its checksum): "
        "see the raft_data log",
    )
    if state is None or state.phase != "Succeeded":
        if state is not None and state.phase == "Failed":
            op.patch_status(
                body,
                _status(
                    body,
                    "Failed",
                    "Failed",
                    state.reason,
                    f"data generation failed: {state.message}",
                ),
            )
        elif status.get("stage") != "GeneratingData" or status.get("phase") != "Running":
            op.patch_status(
                body,
                _status(
                    body, "Running", "GeneratingData", "GeneratingData", "building RAFT examples"
                ),
            )
        return

    # Stage 2: the child FineTuneJob.
    ftj_name = child_fine_tune_name(parent)
    ftj = op.get("FineTuneJob", parent.namespace, ftj_name)
    if ftj is None:
        op.runtime.apply(build_child_fine_tune(spec, parent, settings))
        ftj = op.get("FineTuneJob", parent.namespace, ftj_name) or {}
    ftj_status = ftj.get("status") or {}
    if ftj_status.get("phase") != "Succeeded":
        if ftj_status.get("phase") == "Failed":
            op.patch_status(
                body,
                _status(
                    body,
                    "Failed",
                    "Failed",
                    "FineTuneFailed",
                    f"FineTuneJob {ftj_name} failed",
                    fineTuneJob=ftj_name,
                ),
            )
        else:
            # the child's queue state shows through: a RAFTJob whose training waits in
            # Kueue says so (and why) instead of "training"
            queued = ftj_status.get("phase") in ("Queued", "Suspended")
            child: dict[str, Any] = next(
                (c for c in ftj_status.get("conditions") or [] if c.get("type") == "Ready"), {}
            )
            reason = str(child.get("reason") or "Queued") if queued else "Training"
            message = f"training in FineTuneJob {ftj_name}"
            if queued:
                message += f", {ftj_status['phase']}: {child.get('message') or ''}"
            op.patch_status(
                body,
                _status(body, "Running", "Training", reason, message, fineTuneJob=ftj_name),
            )
        return
    artifact = ftj_status.get("artifact")

    # Stage 3: serve base + adapter, then evaluate.
    md_name = eval_deployment_name(parent)
    md = op.get("ModelDeployment", parent.namespace, md_name)
    if md is None:
        op.runtime.apply(build_eval_deployment(spec, parent))
        md = op.get("ModelDeployment", parent.namespace, md_name) or {}
    md_status = md.get("status") or {}
    if md_status.get("phase") != "Ready" or not md_status.get("endpoint"):
        if status.get("stage") != "Evaluating":
            op.patch_status(
                body,
                _status(
                    body,
                    "Running",
                    "Evaluating",
                    "StartingServer",
                    f"waiting for ModelDeployment {md_name}",
                    fineTuneJob=ftj_name,
                    artifact=artifact,
                ),
            )
        return
    endpoints = {
        system: EvalTarget(
            base_url=md_status["endpoint"], model=md_name if system == "rag" else f"{md_name}/raft"
        )
        for system in spec.evaluation.compare
    }
    evaluation = build_evaluation_stage(spec, parent, settings, retriever, endpoints)
    state = op.runtime.run_state(parent.namespace, evaluation.name)
    if state is None:
        op.runtime.start(evaluation)
        state = op.runtime.run_state(parent.namespace, evaluation.name)
    state = require_report(
        state,
        "evaluation.artifact.sha256",
        "EvaluationMissing",
        "the evaluation Job completed but reported no scores (results.jsonl with its "
        "checksum): see the evaluate log",
    )
    if state is None or state.phase not in ("Succeeded", "Failed"):
        ready: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        if status.get("stage") != "Evaluating" or ready.get("reason") == "StartingServer":
            op.patch_status(
                body,
                _status(
                    body,
                    "Running",
                    "Evaluating",
                    "Evaluating",
                    "comparing RAG and RAFT",
                    fineTuneJob=ftj_name,
                    artifact=artifact,
                ),
            )
        return
    op.runtime.delete("tailor.dev/v1alpha1", "ModelDeployment", parent.namespace, md_name)
    if state.phase == "Failed":
        op.patch_status(
            body,
            _status(body, "Failed", "Failed", state.reason, f"evaluation failed: {state.message}"),
        )
        return
    op.patch_status(
        body,
        _status(
            body,
            "Succeeded",
            "Succeeded",
            "Evaluated",
            "RAFT adapter trained and evaluated",
            fineTuneJob=ftj_name,
            artifact=artifact,
        ),
    )
