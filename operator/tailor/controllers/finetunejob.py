"""FineTuneJob controller: apply the training workload and mirror its state in status.

Phases: Pending (starting), Queued (unschedulable, with the scheduler's message), Running,
Succeeded (artifact published and verified by the trainer, reported in its termination
message), Failed (BackoffLimitExceeded, DeadlineExceeded, ArtifactMissing, or the trainer's
own reason such as InvalidDataset), Suspended. Progress fields are written by
the trainer itself through its per-run ServiceAccount; the operator owns the phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailor.api import KINDS, ManifestError, parse_spec
from tailor.api.finetunejob import FineTuneJobSpec
from tailor.api.settings import OperatorSettings
from tailor.builders.common import Parent, Workload, content_hash
from tailor.builders.finetunejob import QUEUE_LABEL, artifact_uri, build_training, queue_of
from tailor.controllers import kueue
from tailor.controllers.context import Operator, changed, condition, syncer
from tailor.controllers.gate import sync_gate
from tailor.observability.operator import PHASES, RUN_SECONDS
from tailor.runtime.base import RunState, require_report

KIND = "FineTuneJob"


def invalid_status(body: dict[str, Any], error: ManifestError) -> dict[str, Any]:
    status = body.get("status") or {}
    return {
        "phase": "Failed",
        "observedGeneration": body["metadata"].get("generation"),
        "conditions": condition(
            status.get("conditions"), "Ready", False, "InvalidSpec", "; ".join(error.lines)
        ),
    }


@dataclass
class FineTuneSync:
    """One sync of a FineTuneJob: its spec and settings, and its training Job as found."""

    body: dict[str, Any]
    spec: FineTuneJobSpec
    parent: Parent
    settings: OperatorSettings
    queue: str | None
    """The LocalQueue the run joins (its own, else the operator's default), or None."""
    workload: Workload
    state: RunState | None
    """The training Job's state; None while status names no Job, or when the Job is gone."""
    job: dict[str, Any] | None
    spec_hash: str
    job_spec_hash: str | None
    """The hash of the spec the Job was made with (this spec's when there is no Job)."""
    workload_of_run: dict[str, Any] | None = None
    """A queued run's Workload, read once per sync (None: finished, or not made yet)."""

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.body["metadata"]
        return meta

    @property
    def status(self) -> dict[str, Any]:
        return self.body.get("status") or {}

    @property
    def job_queue(self) -> str | None:
        """The queue of the Job that exists (it keeps the queue it was created with)."""
        return ((self.job or {}).get("metadata", {}).get("labels") or {}).get(QUEUE_LABEL)

    @property
    def queued(self) -> bool:
        """Whether the Job that exists is queued: Kueue owns its ``suspend``."""
        return self.job is not None and bool(self.job_queue)


@syncer(KIND)
def sync_fine_tune_job(op: Operator, body: dict[str, Any]) -> None:
    run = _start(op, body)
    if run is not None:
        all(stage(op, run) for stage in STAGES)  # in order, up to the first not done


def _start(op: Operator, body: dict[str, Any]) -> FineTuneSync | None:
    """The run and its training Job as found; None (status written where it changes)
    when the spec is invalid or the run is settled."""
    meta, status = body["metadata"], body.get("status") or {}
    try:
        spec = parse_spec(KINDS[KIND], body["spec"])
    except ManifestError as error:
        op.patch_status(body, invalid_status(body, error))
        return None
    assert isinstance(spec, FineTuneJobSpec)
    if (
        status.get("jobName")
        and status.get("phase") in ("Succeeded", "Failed")
        and status.get("observedGeneration") == meta.get("generation")
    ):
        # Settled: the Job finished and its template is immutable, so the pod events that
        # follow (garbage collection) change nothing; do not read the Job and its pods again
        # (nor start a new training if someone deleted the finished Job).
        PHASES.record(KIND, meta["namespace"], meta["name"], status["phase"])
        if status["phase"] == "Succeeded" and spec.evaluation is not None:
            sync_gate(op, body, spec.evaluation)  # the trained adapter against its gate
        return None
    parent = Parent.from_body(body)
    settings = op.settings.for_store(spec.output.store)
    queue = queue_of(spec, settings.default_queue_name)
    if spec.priority_class_name and not queue:
        op.patch_status(
            body,
            invalid_status(
                body,
                ManifestError(
                    [
                        "spec.priorityClassName: a WorkloadPriorityClass orders runs in a "
                        "Kueue queue; set spec.queueName (or the operator's kueue.defaultQueue) "
                        "or remove spec.priorityClassName"
                    ]
                ),
            ),
        )
        return None
    workload = build_training(spec, parent, settings)
    # Read the Job only when one may exist; apply children only when something must change
    # (the Job is missing, or suspend was toggled): every Job and Pod event lands here.
    state = op.runtime.run_state(parent.namespace, workload.name) if status.get("jobName") else None
    job = op.cache.get("Job", parent.namespace, workload.name) if state is not None else None
    spec_hash = content_hash({k: v for k, v in body["spec"].items() if k != "suspend"})
    job_spec_hash = status.get("jobSpecHash") if state is not None else spec_hash
    return FineTuneSync(
        body, spec, parent, settings, queue, workload, state, job, spec_hash, job_spec_hash
    )


def _may_join_queue(op: Operator, run: FineTuneSync) -> bool:
    """A run with a queue and no Job yet can join it (Kueue installed, the LocalQueue and
    WorkloadPriorityClass there) and is not suspended; else Pending or Suspended, saying why."""
    if run.state is None and run.queue:
        problem = queue_problem(op, run.settings, run.spec, run.parent.namespace, run.queue)
        if problem is None and run.spec.suspend:
            problem = (
                "Suspended",
                f"suspended before joining LocalQueue {run.queue}: the training Job is created "
                "(and queued) when spec.suspend is false",
            )
        if problem:
            op.patch_status(run.body, not_started(run.body, problem))
            return False
    return True


def _queued_run_follows_suspend(op: Operator, run: FineTuneSync) -> bool:
    """A queued, unfinished run's Workload, (de)activated as ``spec.suspend`` says."""
    state, job = run.state, run.job
    unfinished = state is not None and state.phase not in ("Succeeded", "Failed")
    if job is not None and run.job_queue and unfinished:
        run.workload_of_run = kueue.workload_of_job(
            op.api_client, run.parent.namespace, job["metadata"]["uid"]
        )
        if run.workload_of_run is not None:
            suspend_in_queue(op, run.workload_of_run, run.spec.suspend)
    return True


def _job_applied(op: Operator, run: FineTuneSync) -> bool:
    """An unqueued run's Job exists and is (un)suspended as ``spec.suspend`` says: started
    when missing (once its artifact store can hold it) or when suspend was toggled."""
    state = run.state
    if not run.queued and (
        state is None
        or (
            state.phase not in ("Succeeded", "Failed")
            and run.spec.suspend != (state.phase == "Suspended")
        )
    ):
        op.runtime.prepare_namespace(run.parent.namespace)
        problem = (
            storage_problem(op, run.settings, run.spec, run.parent.namespace)
            if state is None
            else None
        )
        if problem:
            op.patch_status(run.body, not_started(run.body, problem))
            return False
        op.runtime.start(run.workload)
        # Read what was applied, also for a run that had no Job in its status: a leader
        # killed between creating the Job and writing the status leaves a Job that may have
        # finished already; its last events came before this sync, so nothing would sync the
        # run again until the resync. The applied Job is in the watch cache: no request.
        run.state = op.runtime.run_state(run.parent.namespace, run.workload.name)
    return True


def _status_written(op: Operator, run: FineTuneSync) -> bool:
    """Last stage: the phase the run has reached (:func:`_observe`) written with its
    conditions, times, artifact and queue."""
    run.state = require_artifact(run.state)
    seen = _observe(op, run)
    new = _status_of(run, seen)
    status, state, phase = run.status, run.state, seen.phase
    if seen.queue is not None:
        old_queue = status.get("queue") or {}
        fresh = {k: v for k, v in seen.queue.items() if v is not None}
        if fresh != old_queue:  # merge patch: stale keys (a finished wait's position) go null
            new["queue"] = {**{k: None for k in old_queue if k not in fresh}, **fresh}
        kueue.record(KIND, old_queue, fresh)
    if phase in ("Succeeded", "Failed") and status.get("phase") not in ("Succeeded", "Failed"):
        if state and state.start_time and state.completion_time:
            RUN_SECONDS.labels(KIND, phase).observe(
                _seconds(state.start_time, state.completion_time)
            )
    op.patch_status(run.body, without_first_attempt_news(status, new))
    if phase == "Succeeded" and run.spec.evaluation is not None:  # on to its gate, now
        op.queue.add_after((KIND, run.parent.namespace, run.parent.name), 0.0)
    return True


STAGES: tuple[Callable[[Operator, FineTuneSync], bool], ...] = (
    _may_join_queue,
    _queued_run_follows_suspend,
    _job_applied,
    _status_written,
)
"""The stages in order; a sync stops at the first that is not done."""


@dataclass(frozen=True)
class Observed:
    """Where the run stands: the phase, and the reason and message of its conditions;
    for a queued run, Kueue's view of its queue (``status.queue``)."""

    phase: str
    reason: str
    message: str
    queue: dict[str, Any] | None = None


def _observe(op: Operator, run: FineTuneSync) -> Observed:
    """The Job's phase, or Kueue's while a queued run waits there (Queued, Suspended) or
    is admitted with its pods not yet running (Admitted); never back from Running at the
    same spec."""
    state, status, meta = run.state, run.status, run.meta
    phase: str = state.phase if state else "Pending"
    reason = state.reason if state else "Starting"
    message = state.message if state else ""
    queue_info: dict[str, Any] | None = None
    waiting_in_queue = False  # Kueue holds it (waiting, preempted): not Running, whatever before
    if run.queued and run.job_queue and phase not in ("Succeeded", "Failed"):
        spec = run.spec
        need = spec.resources.gpus * spec.resources.nodes
        seen = kueue.view(
            op.api_client,
            run.parent.namespace,
            run.job_queue,
            run.workload_of_run,
            need,
            spec.resources.gpu_resource,
        )
        queue_info = seen.queue
        waiting_in_queue = bool(seen.phase)
        if seen.phase:  # waiting (or suspended) in the queue: Kueue says why
            phase, reason, message = seen.phase, seen.reason, seen.message
        elif phase in ("Pending", "Suspended"):  # admitted, pods not yet running
            phase, reason, message = "Admitted", seen.reason, seen.message
    if (
        status.get("phase") == "Running"
        and phase in ("Pending", "Queued")
        and not waiting_in_queue
        and status.get("observedGeneration") == meta.get("generation")
    ):
        # Never back from Running at the same spec: a retry's pod waiting for a node, or a
        # Job whose pod finished before the Job controller counted it, is still running.
        phase, reason, message = "Running", "Running", ""
    return Observed(phase, reason, message, queue_info)


def _status_of(run: FineTuneSync, seen: Observed) -> dict[str, Any]:
    """The status of a run at ``seen``: phase, times, artifact and conditions (Ready,
    Scheduled, SpecApplied), without ``queue``."""
    state, status = run.state, run.status
    phase, reason, message = seen.phase, seen.reason, seen.message
    conditions = status.get("conditions")
    generation = run.meta.get("generation")
    new: dict[str, Any] = {
        "phase": phase,
        "jobName": run.workload.name,
        "observedGeneration": generation,
    }
    if state:
        new["attempts"] = state.attempts
        if state.start_time:
            new["startTime"] = state.start_time
        if state.completion_time:
            new["completionTime"] = state.completion_time
    if phase == "Succeeded":
        artifact = dict(status.get("artifact") or {})
        artifact["uri"] = artifact_uri(run.spec, run.parent, run.settings)
        reported = ((state.result if state else None) or {}).get("artifact") or {}
        if reported.get("sha256"):
            artifact["sha256"] = reported["sha256"]
        new["artifact"] = artifact
        message = f"artifact published at {artifact['uri']}"
    conditions = condition(conditions, "Ready", phase == "Succeeded", reason, message, generation)
    conditions = condition(
        conditions,
        "Scheduled",
        phase not in ("Queued", "Pending", "Admitted"),
        reason,
        message if phase == "Queued" else "",
        generation,
    )
    # A Job's pod template is immutable: a spec change after the Job exists (other than
    # suspend) cannot reach the running training. Say so instead of ignoring it silently.
    applied = run.job_spec_hash in (None, run.spec_hash)
    conditions = condition(
        conditions,
        "SpecApplied",
        applied,
        "Applied" if applied else "JobImmutable",
        ""
        if applied
        else "spec changed after the training Job was created; the Job keeps the spec it "
        "started with (Job templates are immutable): delete and re-create the FineTuneJob "
        "to train with the new spec",
        generation,
    )
    new["conditions"] = conditions
    new["jobSpecHash"] = run.job_spec_hash or run.spec_hash
    return new


def not_started(body: dict[str, Any], problem: tuple[str, str]) -> dict[str, Any]:
    """Status of a run whose Job is not created: Pending with the (reason, message) of
    what is missing, or Suspended (reason Suspended)."""
    generation = body["metadata"].get("generation")
    conditions = (body.get("status") or {}).get("conditions")
    return {
        "phase": "Suspended" if problem[0] == "Suspended" else "Pending",
        "observedGeneration": generation,
        "conditions": condition(conditions, "Ready", False, *problem, generation),
    }


def queue_problem(
    op: Operator, settings: OperatorSettings, spec: FineTuneJobSpec, namespace: str, queue: str
) -> tuple[str, str] | None:
    """(reason, message) of why the run cannot join ``queue`` (Kueue missing, no such
    LocalQueue or WorkloadPriorityClass), or None."""
    if settings.runtime != "kubernetes":
        return (
            "KueueNotInstalled",
            f"spec.queueName {queue!r} needs Kueue on a Kubernetes cluster; the local runtime "
            "has no queues: remove spec.queueName",
        )
    return kueue.queue_problem(
        op.api_client, namespace, queue, spec.priority_class_name, bool(spec.queue_name)
    )


def suspend_in_queue(op: Operator, workload: dict[str, Any], suspend: bool) -> None:
    """``spec.suspend`` of a queued run: Kueue owns the Job's ``suspend``, so the run is
    paused by deactivating its Workload (Kueue evicts it and suspends the Job) and resumed
    by activating it again (back in the queue)."""
    if (workload.get("spec") or {}).get("active", True) == suspend:
        kueue.set_active(op.api_client, workload, not suspend)


def storage_problem(
    op: Operator, settings: OperatorSettings, spec: FineTuneJobSpec, namespace: str
) -> tuple[str, str] | None:
    """(reason, message) of why the run's artifact store cannot hold it, or None: an s3
    store without an S3 connection (StoreNotConfigured), or a multi-node run on a claim one
    node only can attach (ReadWriteManyRequired)."""
    missing = settings.store_problem("spec.output.store")
    if missing:
        return "StoreNotConfigured", missing
    unshared = unshared_storage(op, settings, spec, namespace)
    return ("ReadWriteManyRequired", unshared) if unshared else None


def unshared_storage(
    op: Operator, settings: OperatorSettings, spec: FineTuneJobSpec, namespace: str
) -> str | None:
    """Why a multi-node run cannot start on the pvc store: every node's pod mounts the
    artifacts claim, and a ReadWriteOnce claim attaches to one node only (EBS, Persistent
    Disk, Azure Disk), so the pods of other nodes would never start. None when it can."""
    nodes = spec.resources.nodes
    if nodes <= 1 or settings.artifacts_store != "pvc" or settings.runtime != "kubernetes":
        return None
    name = settings.artifacts_pvc
    claim = op.runtime.get("v1", "PersistentVolumeClaim", namespace, name)
    if claim is None:
        return None  # not created here (createArtifactsPvc off): its pods will say
    modes = (
        (claim.get("status") or {}).get("accessModes")
        or (claim.get("spec") or {}).get("accessModes")
        or []
    )
    if "ReadWriteMany" in modes:
        return None
    return (
        f"spec.resources.nodes is {nodes}: the pod of every node mounts the artifacts "
        f"claim {namespace}/{name}, whose access modes {modes} let only one node attach it, "
        "so the other nodes' pods would never start. Fix: give the claim ReadWriteMany "
        "(Helm: artifacts.accessMode=ReadWriteMany with an RWX storageClass such as EFS, "
        "Filestore, Azure Files or NFS; delete the old claim), use the s3 artifact store "
        "(Helm: artifacts.store=s3, or spec.output.store: s3 for this run), or set "
        "spec.resources.nodes to 1"
    )


def without_first_attempt_news(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` without ``startTime`` and ``attempts`` when they are all that changed and
    the run is still on its first attempt in the same phase: the Job controller sets them
    between the operator's Pending and Running writes, and a write of its own would cost a
    request per FineTuneJob for no news (the next phase change carries them). A retry
    (attempts 2 and up) is written at once."""
    if new.get("phase") != old.get("phase") or int(new.get("attempts") or 0) > 1:
        return new
    rest = {k: v for k, v in new.items() if k not in ("startTime", "attempts")}
    return new if changed(old, rest) else rest


def require_artifact(state: RunState | None) -> RunState | None:
    """A completed training Job is Succeeded only if its trainer reported the artifact it
    published and verified (manifest.json present, every file's sha256 as listed); a Job
    that completes without that report is Failed with reason ArtifactMissing."""
    return require_report(
        state,
        "artifact.sha256",
        "ArtifactMissing",
        "the training Job completed but its trainer reported no verified artifact "
        "(manifest.json with checksums): see the trainer's log",
    )


def _seconds(start: str, end: str) -> float:
    import datetime as dt

    def parse(s: str) -> dt.datetime:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))

    return max(0.0, (parse(end) - parse(start)).total_seconds())
