"""FineTuneJob children: the training Job (Indexed + a headless Service for torchrun when
``resources.nodes > 1``), its spec ConfigMap and the per-run reporting RBAC."""

from __future__ import annotations

from tailor.api.common import ModelSource
from tailor.api.finetunejob import FineTuneJobSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import TrainRun
from tailor.builders.common import (
    SPEC_DIR,
    SPEC_FILE,
    Manifest,
    Mounts,
    Parent,
    Program,
    Workload,
    artifact_dir,
    batch_job,
    child_name,
    metadata,
    pod_placement,
    pod_security_context,
    reporter,
    reporter_rbac,
    spec_config_map,
    store_uri,
    volumes_and_mounts,
    workload_container,
    workload_paths,
)

RENDEZVOUS_PORT = 29500


def queue_of(spec: FineTuneJobSpec, default: str | None) -> str | None:
    """The Kueue LocalQueue a run joins: its own ``queueName``, else the operator's default."""
    return spec.queue_name or default


QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def queue_labels(queue: str | None, priority_class: str | None) -> dict[str, str]:
    """The labels that put a Job in a Kueue queue (none without a queue)."""
    if not queue:
        return {}
    labels = {QUEUE_LABEL: queue}
    if priority_class:
        labels[PRIORITY_LABEL] = priority_class
    return labels


def output_dir(spec: FineTuneJobSpec, parent: Parent, settings: OperatorSettings) -> str:
    """Where the artifact is written inside the pod."""
    if spec.output.pvc:
        return f"/mnt/pvc/{spec.output.pvc.claim_name}/{spec.output.pvc.path}".rstrip("/")
    return f"{settings.artifacts_mount}/{artifact_dir(parent)}/model"


def artifact_uri(spec: FineTuneJobSpec, parent: Parent, settings: OperatorSettings) -> str:
    if spec.output.pvc:
        return f"pvc://{spec.output.pvc.claim_name}/{spec.output.pvc.path}".rstrip("/")
    return store_uri(settings, parent.namespace, f"{artifact_dir(parent)}/model")


def build_train_run(spec: FineTuneJobSpec, parent: Parent, settings: OperatorSettings) -> TrainRun:
    return TrainRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        metrics_port=settings.metrics_port,
        spec=spec,
        output_dir=output_dir(spec, parent, settings),
        checkpoint_dir=f"{settings.artifacts_mount}/{artifact_dir(parent)}/checkpoints",
    )


def launcher(name: str, nodes: int, gpus: int) -> list[str] | None:
    """torchrun when the run has more than one process (one per GPU, on every node):
    ``--standalone`` on one node; across nodes a static rendezvous on the pod of index 0
    (``<job>-0.<service>``, the Indexed Job's stable hostname), ``--node-rank`` from the
    completion index. One process (or a CPU pod) runs the trainer directly."""
    procs = max(gpus, 1)
    if nodes == 1 and procs == 1:
        return None
    program = ["-m", f"tailor.workloads.{Program.TRAINER}", "--spec", f"{SPEC_DIR}/{SPEC_FILE}"]
    if nodes == 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={procs}", *program]
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={procs}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={name}-0.{name}",
        f"--master-port={RENDEZVOUS_PORT}",
        *program,
    ]


def build_training(spec: FineTuneJobSpec, parent: Parent, settings: OperatorSettings) -> Workload:
    """The training workload of a FineTuneJob."""
    name = child_name(parent, "train")
    queue = queue_of(spec, settings.default_queue_name)
    run = build_train_run(spec, parent, settings)
    mounts = (
        Mounts()
        .add_sources([spec.dataset.train, spec.dataset.validation])
        .add_model(spec.base_model)
        .add_pvc(spec.output.pvc)
    )
    if spec.preference.reference:  # the adapter a preference run continues
        mounts.add_model(ModelSource(uri=spec.preference.reference.uri))
    volumes, volume_mounts = volumes_and_mounts(settings, mounts, name)
    if spec.output.pvc:  # the output volume must be writable
        for m in volume_mounts:
            if m["mountPath"] == f"/mnt/pvc/{spec.output.pvc.claim_name}":
                m["readOnly"] = False
        for v in volumes:
            claim = v.get("persistentVolumeClaim", {})
            if claim.get("claimName") == spec.output.pvc.claim_name:
                claim["readOnly"] = False
    nodes, gpus = spec.resources.nodes, spec.resources.gpus
    command = launcher(name, nodes, gpus)
    container = workload_container(
        settings, "trainer", Program.TRAINER, spec.resources, volume_mounts, command=command
    )
    if nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    pod: Manifest = {
        "serviceAccountName": name,
        "securityContext": pod_security_context(settings),
        "containers": [container],
        "volumes": volumes,
        **pod_placement(spec.resources),
    }
    if nodes > 1:
        pod["subdomain"] = name
    job = batch_job(
        parent,
        name,
        "trainer",
        pod,
        backoff_limit=spec.backoff_limit,
        active_deadline_seconds=spec.active_deadline_seconds,
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
        # A queued Job starts suspended and only Kueue unsuspends it (on admission).
        suspend=spec.suspend or queue is not None,
        completions=nodes,
    )
    job["metadata"]["labels"].update(queue_labels(queue, spec.priority_class_name))
    manifests = [
        spec_config_map(parent, name, "trainer", run),
        *reporter_rbac(parent, name, "trainer", "finetunejobs"),
    ]
    if nodes > 1:
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(parent, name, "trainer"),
                "spec": {
                    "clusterIP": "None",
                    "selector": {"job-name": name},
                    "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
                    "publishNotReadyAddresses": True,
                },
            }
        )
    manifests.append(job)
    return Workload(
        name=name,
        module=Program.TRAINER,
        run=run,
        manifests=manifests,
        backoff_limit=spec.backoff_limit,
        active_deadline_seconds=spec.active_deadline_seconds,
        suspend=spec.suspend or queue is not None,
    )
