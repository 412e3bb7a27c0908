"""RAFTJob controller: GeneratingData (a Job), Training (a child FineTuneJob), Evaluating
(a child ModelDeployment serving base + RAFT adapter, then an evaluation Job), Succeeded.
A stage's Job counts as done only with its workload's report (the dataset's, the scores'
checksum) in its termination message; a Job that completes without one fails the RAFTJob
(DatasetMissing, EvaluationMissing).

Every stage is derived from the children that exist, so a restarted operator continues
where the previous one stopped; ``status.stage`` shows it to users. A sync checks the
inputs (:func:`_start`), then runs the stages in order (:data:`STAGES`), each one function
that returns True when its stage is done and False when the run waits in it (or failed
there), its status written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tailor.api import API_VERSION, KINDS, ManifestError, parse_spec
from tailor.api.knowledgebase import KnowledgeBaseSpec
from tailor.api.raftjob import RAFTJobSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import EvalTarget, RetrieverConfig
from tailor.builders.common import Parent, Workload
from tailor.builders.knowledgebase import retriever_config
from tailor.builders.raftjob import (
    build_child_fine_tune,
    build_data_stage,
    build_eval_deployment,
    build_evaluation_stage,
    child_fine_tune_name,
    eval_deployment_name,
)
from tailor.controllers.children import is_owned_by
from tailor.controllers.context import Operator, condition, syncer
from tailor.runtime.base import RunState, require_report

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


@dataclass
class RaftSync:
    """One sync of a RAFTJob: its inputs, and what each stage leaves for the next."""

    body: dict[str, Any]
    spec: RAFTJobSpec
    parent: Parent
    settings: OperatorSettings
    retriever: RetrieverConfig
    status: dict[str, Any] = field(init=False)
    teacher_url: str | None = None
    """Where the question generator's teacher answers (stage GeneratingData)."""
    artifact: Any = None
    """The child FineTuneJob's artifact (stage Training), reported from then on."""
    endpoint: str = ""
    """The evaluation ModelDeployment's endpoint (stage Evaluating)."""

    def __post_init__(self) -> None:
        self.status = self.body.get("status") or {}

    @property
    def fine_tune_job(self) -> str:
        return child_fine_tune_name(self.parent)

    @property
    def deployment(self) -> str:
        return eval_deployment_name(self.parent)

    @property
    def trained(self) -> dict[str, Any]:
        """The status fields of a trained run: its FineTuneJob and the artifact."""
        return {"fineTuneJob": self.fine_tune_job, "artifact": self.artifact}

    def adopts(self, op: Operator, kind: str, child: dict[str, Any] | None) -> bool:
        """Whether ``child`` (None: absent, to be created) is this run's own: an object of
        the same name that no owner reference with this RAFTJob's uid claims is never
        used, replaced or deleted; the run fails naming it (a name collision, or another
        tenant's object, is not a takeover)."""
        if child is None or is_owned_by(child, self.parent.uid):
            return True
        name = child["metadata"]["name"]
        self.patch(
            op,
            "Failed",
            "Failed",
            "NameTaken",
            f"{kind} {name} exists and was not created by this RAFTJob (no owner reference "
            f"with its uid); Tailor does not adopt it: rename or delete that {kind}, or this "
            "RAFTJob",
        )
        return False

    def patch(
        self, op: Operator, phase: str, stage: str, reason: str, message: str, **extra: Any
    ) -> None:
        op.patch_status(self.body, _status(self.body, phase, stage, reason, message, **extra))


@syncer(KIND)
def sync_raft_job(op: Operator, body: dict[str, Any]) -> None:
    status = body.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") and status.get("stage") in (
        "Succeeded",
        "Failed",
    ):
        return
    run = _start(op, body)
    if run is not None:
        all(stage(op, run) for stage in STAGES)  # in order, up to the first not done


def _start(op: Operator, body: dict[str, Any]) -> RaftSync | None:
    """The run's inputs, its namespace prepared; None (status written) when its spec is
    invalid, its KnowledgeBase not Ready or its artifact store not configured."""
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        op.patch_status(
            body, _status(body, "Failed", "Failed", "InvalidSpec", "; ".join(error.lines))
        )
        return None
    assert isinstance(spec, RAFTJobSpec)
    parent = Parent.from_body(body)
    retriever = _knowledge_base_retriever(op, body, spec, parent)
    if retriever is None:
        return None
    settings = op.settings.for_store(spec.output.store)
    problem = settings.store_problem("spec.output.store")
    if problem:
        op.patch_status(body, _status(body, "Failed", "Failed", "StoreNotConfigured", problem))
        return None
    op.runtime.prepare_namespace(parent.namespace)
    return RaftSync(body, spec, parent, settings, retriever)


def _knowledge_base_retriever(
    op: Operator, body: dict[str, Any], spec: RAFTJobSpec, parent: Parent
) -> RetrieverConfig | None:
    """How the stages reach the KnowledgeBase's index once it is Ready; None (Pending,
    WaitingForKnowledgeBase) before."""
    kb = op.get("KnowledgeBase", parent.namespace, spec.knowledge_base_ref.name)
    if kb is None or (kb.get("status") or {}).get("phase") != "Ready":
        phase = ((kb or {}).get("status") or {}).get("phase") or (
            "not found" if kb is None else "Pending"
        )
        message = f"waiting for KnowledgeBase {spec.knowledge_base_ref.name} ({phase})"
        op.patch_status(
            body, _status(body, "Pending", "GeneratingData", "WaitingForKnowledgeBase", message)
        )
        return None
    kb_spec = parse_spec(KINDS["KnowledgeBase"], kb["spec"])
    assert isinstance(kb_spec, KnowledgeBaseSpec)
    return retriever_config(kb_spec, Parent.from_body(kb), op.settings, kb.get("status") or {})


def _teacher_ready(op: Operator, run: RaftSync) -> bool:
    """Stage 1a: the teacher that generates questions answers (a ModelDeployment's
    endpoint, or a URL); done at once without generated questions."""
    generate = run.spec.questions.generate
    if generate:
        teacher = generate.teacher
        if teacher.deployment_ref:
            md = op.get("ModelDeployment", run.parent.namespace, teacher.deployment_ref.name)
            run.teacher_url = ((md or {}).get("status") or {}).get("endpoint")
            if not run.teacher_url:
                run.patch(
                    op,
                    "Pending",
                    "GeneratingData",
                    "WaitingForTeacher",
                    f"waiting for ModelDeployment {teacher.deployment_ref.name}",
                )
                return False
        else:
            run.teacher_url = teacher.url
    return True


def _data_generated(op: Operator, run: RaftSync) -> bool:
    """Stage 1b: the data Job, started if missing, has reported its dataset."""
    data = build_data_stage(run.spec, run.parent, run.settings, run.retriever, run.teacher_url)
    state = _job_state(
        op,
        run,
        data,
        "dataset.artifact.sha256",
        "DatasetMissing",
        "the data Job completed but reported no dataset (manifest.json with its checksum): "
        "see the raft_data log",
    )
    if state is not None and state.phase == "Succeeded":
        return True
    if state is not None and state.phase == "Failed":
        run.patch(op, "Failed", "Failed", state.reason, f"data generation failed: {state.message}")
    elif run.status.get("stage") != "GeneratingData" or run.status.get("phase") != "Running":
        run.patch(op, "Running", "GeneratingData", "GeneratingData", "building RAFT examples")
    return False


def _fine_tuned(op: Operator, run: RaftSync) -> bool:
    """Stage 2: the child FineTuneJob, applied if missing, has Succeeded; its artifact is
    the run's."""
    ftj_name = run.fine_tune_job
    ftj = op.get("FineTuneJob", run.parent.namespace, ftj_name)
    if not run.adopts(op, "FineTuneJob", ftj):
        return False
    if ftj is None:
        op.runtime.apply(build_child_fine_tune(run.spec, run.parent, run.settings))
        ftj = op.get("FineTuneJob", run.parent.namespace, ftj_name) or {}
    ftj_status = ftj.get("status") or {}
    if ftj_status.get("phase") == "Succeeded":
        run.artifact = ftj_status.get("artifact")
        return True
    if ftj_status.get("phase") == "Failed":
        run.patch(
            op,
            "Failed",
            "Failed",
            "FineTuneFailed",
            f"FineTuneJob {ftj_name} failed",
            fineTuneJob=ftj_name,
        )
        return False
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
    run.patch(op, "Running", "Training", reason, message, fineTuneJob=ftj_name)
    return False


def _server_ready(op: Operator, run: RaftSync) -> bool:
    """Stage 3a: the ModelDeployment serving base + RAFT adapter, applied if missing, is
    Ready with an endpoint."""
    md_name = run.deployment
    md = op.get("ModelDeployment", run.parent.namespace, md_name)
    if not run.adopts(op, "ModelDeployment", md):
        return False
    if md is None:
        op.runtime.apply(build_eval_deployment(run.spec, run.parent))
        md = op.get("ModelDeployment", run.parent.namespace, md_name) or {}
    md_status = md.get("status") or {}
    if md_status.get("phase") == "Ready" and md_status.get("endpoint"):
        run.endpoint = md_status["endpoint"]
        return True
    if run.status.get("stage") != "Evaluating":
        run.patch(
            op,
            "Running",
            "Evaluating",
            "StartingServer",
            f"waiting for ModelDeployment {md_name}",
            **run.trained,
        )
    return False


def _evaluated(op: Operator, run: RaftSync) -> bool:
    """Stage 3b: the evaluation Job, started if missing, has finished; then the server is
    deleted and the run Succeeded (or Failed with the evaluation's reason)."""
    md_name = run.deployment
    endpoints = {
        system: EvalTarget(
            base_url=run.endpoint, model=md_name if system == "rag" else f"{md_name}/raft"
        )
        for system in run.spec.evaluation.compare
    }
    evaluation = build_evaluation_stage(
        run.spec, run.parent, run.settings, run.retriever, endpoints
    )
    state = _job_state(
        op,
        run,
        evaluation,
        "evaluation.artifact.sha256",
        "EvaluationMissing",
        "the evaluation Job completed but reported no scores (results.jsonl with its "
        "checksum): see the evaluate log",
    )
    if state is None or state.phase not in ("Succeeded", "Failed"):
        ready: dict[str, Any] = next(
            (c for c in run.status.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        if run.status.get("stage") != "Evaluating" or ready.get("reason") == "StartingServer":
            run.patch(
                op,
                "Running",
                "Evaluating",
                "Evaluating",
                "comparing RAG and RAFT",
                **run.trained,
            )
        return False
    if is_owned_by(op.get("ModelDeployment", run.parent.namespace, md_name), run.parent.uid):
        op.runtime.delete(API_VERSION, "ModelDeployment", run.parent.namespace, md_name)
    if state.phase == "Failed":
        run.patch(op, "Failed", "Failed", state.reason, f"evaluation failed: {state.message}")
        return False
    run.patch(
        op,
        "Succeeded",
        "Succeeded",
        "Evaluated",
        "RAFT adapter trained and evaluated",
        **run.trained,
    )
    return True


def _job_state(
    op: Operator, run: RaftSync, job: Workload, report: str, reason: str, message: str
) -> RunState | None:
    """The state of a stage's Job, started if missing; Failed with ``reason`` and
    ``message`` when it completed without its workload's ``report`` (:func:`require_report`)."""
    state = op.runtime.run_state(run.parent.namespace, job.name)
    if state is None:
        op.runtime.start(job)
        state = op.runtime.run_state(run.parent.namespace, job.name)
    return require_report(state, report, reason, message)


STAGES: tuple[Callable[[Operator, RaftSync], bool], ...] = (
    _teacher_ready,
    _data_generated,
    _fine_tuned,
    _server_ready,
    _evaluated,
)
"""The stages in order; a sync stops at the first that is not done."""
