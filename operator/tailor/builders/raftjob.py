"""RAFTJob children, one stage at a time: the data Job (raft_data), the child FineTuneJob
that trains on its output, and the evaluation Job comparing RAG with RAFT."""

from __future__ import annotations

from tailor.api import API_VERSION
from tailor.api.common import DataSource, PvcFiles
from tailor.api.finetunejob import DatasetSpec, FineTuneJobSpec, Output
from tailor.api.raftjob import RAFTJobSpec
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import (
    RAFT_TRAIN_FILE,
    RAFT_VALIDATION_FILE,
    EvalTarget,
    EvaluateRun,
    RaftDataRun,
    RetrieverConfig,
)
from tailor.builders.common import (
    Manifest,
    Mounts,
    Parent,
    Program,
    Workload,
    artifact_dir,
    batch_workload,
    child_name,
    metadata,
    reporter,
    store_uri,
    workload_paths,
)


def dataset_dir(parent: Parent, settings: OperatorSettings) -> str:
    return f"{settings.artifacts_mount}/{artifact_dir(parent)}/data"


def _job(
    spec: RAFTJobSpec,
    parent: Parent,
    settings: OperatorSettings,
    name: str,
    component: str,
    module: Program,
    run: RaftDataRun | EvaluateRun,
    mounts: Mounts,
) -> Workload:
    # RAFT's data and evaluation stages stay on the claim with either store: they read an
    # embedded knowledge base's files and the data the child FineTuneJob trains on.
    return batch_workload(
        parent,
        settings,
        name=name,
        component=component,
        module=module,
        run=run,
        resources=spec.resources,
        mounts=mounts,
        rbac_name=child_name(parent, "raft"),
        plural="raftjobs",
        backoff_limit=1,
        artifacts_volume=True,
    )


def build_data_stage(
    spec: RAFTJobSpec,
    parent: Parent,
    settings: OperatorSettings,
    knowledge_base: RetrieverConfig,
    teacher_url: str | None = None,
) -> Workload:
    name = child_name(parent, "data")
    run = RaftDataRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        spec=spec,
        knowledge_base=knowledge_base,
        output_dir=dataset_dir(parent, settings),
        teacher_url=teacher_url,
    )
    mounts = Mounts().add_sources([spec.questions.source])
    mounts.add_secret(knowledge_base.qdrant.api_key_secret_ref)
    if spec.questions.generate:
        mounts.add_secret(spec.questions.generate.teacher.api_key_secret_ref)
    return _job(spec, parent, settings, name, "raft-data", Program.RAFT_DATA, run, mounts)


def child_fine_tune_name(parent: Parent) -> str:
    return child_name(parent, "ft")


def dataset_file(
    settings: OperatorSettings, namespace: str, data_path: str, name: str
) -> DataSource:
    """One file of the generated dataset as the child FineTuneJob reads it: from the bucket
    with the s3 store (checked against the dataset's upload marker, so the training pods
    mount no claim and may run on several nodes), else from the artifacts claim."""
    if settings.artifacts_store == "s3":
        return DataSource(uri=store_uri(settings, namespace, f"{data_path}/{name}"))
    return DataSource(pvc=PvcFiles(claim_name=settings.artifacts_pvc, path=data_path, glob=name))


def build_child_fine_tune(
    spec: RAFTJobSpec, parent: Parent, settings: OperatorSettings
) -> Manifest:
    """The FineTuneJob (owned by the RAFTJob) that trains on the generated data."""
    data_path = f"{artifact_dir(parent)}/data"
    recipe = spec.fine_tune
    ftj = FineTuneJobSpec(
        base_model=recipe.base_model,
        method=recipe.method,
        lora=recipe.lora,
        training=recipe.training,
        checkpoint=recipe.checkpoint,
        resources=recipe.resources,
        dataset=DatasetSpec(
            train=dataset_file(settings, parent.namespace, data_path, RAFT_TRAIN_FILE),
            validation=dataset_file(settings, parent.namespace, data_path, RAFT_VALIDATION_FILE),
            format="chat",
        ),
        output=Output(store=spec.output.store),
        queue_name=spec.queue_name,
        priority_class_name=spec.priority_class_name,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": metadata(parent, child_fine_tune_name(parent), "fine-tune"),
        "spec": ftj.wire(),
    }


def build_evaluation_stage(
    spec: RAFTJobSpec,
    parent: Parent,
    settings: OperatorSettings,
    knowledge_base: RetrieverConfig,
    endpoints: dict[str, EvalTarget],
) -> Workload:
    name = child_name(parent, "eval")
    run = EvaluateRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        spec=spec,
        knowledge_base=knowledge_base,
        dataset_dir=dataset_dir(parent, settings),
        endpoints=endpoints,
        output_dir=f"{settings.artifacts_mount}/{artifact_dir(parent)}/evaluation",
    )
    mounts = Mounts().add_secret(knowledge_base.qdrant.api_key_secret_ref)
    return _job(spec, parent, settings, name, "evaluator", Program.RAFT_EVALUATION, run, mounts)


def eval_deployment_name(parent: Parent) -> str:
    return child_name(parent, "md")


def build_eval_deployment(spec: RAFTJobSpec, parent: Parent) -> Manifest:
    """A ModelDeployment (owned by the RAFTJob) serving the base model with retrieval and
    the RAFT adapter as ``<name>/raft``: what the evaluation asks."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": metadata(parent, eval_deployment_name(parent), "evaluation"),
        "spec": {
            "baseModel": spec.fine_tune.base_model.wire(),
            "adapters": [
                {"name": "raft", "fineTuneJobRef": {"name": child_fine_tune_name(parent)}}
            ],
            "knowledgeBaseRef": {"name": spec.knowledge_base_ref.name},
            "cache": {"enabled": False},
            "resources": spec.fine_tune.resources.wire(),
        },
    }
