"""Spec files of the workload programs (``python -m tailor.workloads.<name> --spec FILE``).

A builder writes one of these as JSON (a ConfigMap in a cluster, a file with the local
runtime); the workload reads it back with ``<Run>.model_validate_json``. Each run carries
the resource's own spec unchanged plus what the runtime resolved: where volumes are
mounted, where to write, whom to report progress to.

Mount layout, identical in a pod and with the local runtime (see :class:`Paths`):
ConfigMap ``name`` at ``{configMaps}/{name}/<key>``, PVC ``claimName`` at
``{pvcs}/{claimName}/``, Secret ``name`` at ``{secrets}/{name}/<key>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from tailor.api.base import TailorModel
from tailor.api.common import SecretKeyRef
from tailor.api.evaluation import EvaluationSpec
from tailor.api.finetunejob import FineTuneJobSpec
from tailor.api.knowledgebase import Embedding, KnowledgeBaseSpec, QdrantStore, Retrieval
from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.promptprofile import PromptProfileSpec
from tailor.api.raftjob import RAFTJobSpec
from tailor.api.rollout import Rollout


class OwnerRef(TailorModel):
    """The resource a run belongs to and reports to."""

    api_version: str = "tailor.dev/v1alpha1"
    kind: str
    namespace: str
    name: str
    uid: str = ""


class ObjectStore(TailorModel):
    """An S3-compatible bucket that holds the artifacts (AWS S3, GCS's S3 API, MinIO, Ceph
    RGW, SeaweedFS). Credentials are files of a mounted Secret, never values here."""

    bucket: str = Field(min_length=3, description="Bucket name.")
    prefix: str = Field(default="", description="Key prefix of every artifact (no leading /).")
    endpoint: str | None = Field(
        default=None, description="S3 endpoint URL; unset: AWS's for the region."
    )
    region: str = Field(default="us-east-1", description="Region (signing).")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="path", description="path: endpoint/bucket/key (MinIO, SeaweedFS, Ceph)."
    )
    secret_name: str | None = Field(
        default=None, description="Secret with the keys below; unset: the SDK's default chain."
    )
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    credentials_dir: str | None = Field(
        default=None, description="Where that Secret is mounted (one file per key)."
    )

    def key(self, path: str) -> str:
        """The object key of a path under the artifacts root: ``<prefix>/<path>``."""
        return "/".join(p for p in (self.prefix.strip("/"), path.strip("/")) if p)

    def uri(self, path: str) -> str:
        """``s3://<bucket>/<prefix>/<path>``."""
        return f"s3://{self.bucket}/{self.key(path)}"


class Paths(TailorModel):
    """Where the runtime mounted volumes."""

    artifacts: str = Field(
        description="Root of the artifacts volume; with an object store, local scratch that "
        "mirrors the bucket (same relative paths)."
    )
    store: ObjectStore | None = Field(
        default=None, description="Where artifacts live when not on the volume itself."
    )
    s3: ObjectStore | None = Field(
        default=None,
        description="The cluster's S3 connection, for s3:// models, data and adapters (the "
        "bucket comes from each uri); set whenever the operator has one, with either store.",
    )
    config_maps: str = Field(default="/etc/tailor/configmaps", description="ConfigMap mounts.")
    pvcs: str = Field(default="/mnt/pvc", description="PersistentVolumeClaim mounts.")
    secrets: str = Field(default="/etc/tailor/secrets", description="Secret mounts.")


class Reporter(TailorModel):
    """Where progress goes: the resource's status subresource, a JSON-lines file, stdout."""

    kind: Literal["kubernetes", "file", "stdout", "none"] = "stdout"
    path: str | None = Field(default=None, description="File for kind file.")
    min_interval_seconds: float = Field(default=5.0, ge=0, description="Rate limit of reports.")


class RunBase(TailorModel):
    """Fields every workload run has."""

    owner: OwnerRef
    paths: Paths
    reporter: Reporter = Field(default_factory=Reporter)
    metrics_port: int | None = Field(default=None, description="Serve Prometheus metrics here.")


class TrainRun(RunBase):
    """The spec file of ``tailor.workloads.training.trainer``."""

    spec: FineTuneJobSpec
    output_dir: str = Field(description="Where the artifact is published (atomically).")
    checkpoint_dir: str = Field(description="Checkpoints; survives pod restarts.")


class RetrieverConfig(TailorModel):
    """Everything a reader needs to query a knowledge base."""

    alias: str = Field(description="The Qdrant alias (or collection) to query.")
    qdrant: QdrantStore = Field(default_factory=QdrantStore)
    path: str | None = Field(default=None, description="Embedded Qdrant storage folder.")
    embedding: Embedding = Field(default_factory=Embedding)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    embedders: str | None = Field(
        default=None,
        description=(
            "Folder of the embedding models spec.adaptation tuned (on the artifacts volume); "
            "a version names the one its vectors come from."
        ),
    )

    @property
    def on_claim(self) -> bool:
        """Whether readers need the artifacts claim: an embedded index, or embedding models
        tuned by spec.adaptation, live there."""
        return self.path is not None or self.embedders is not None


class IndexRun(RunBase):
    """The spec file of ``tailor.workloads.knowledge.index``."""

    spec: KnowledgeBaseSpec
    target: RetrieverConfig = Field(description="Where the index goes.")
    mode: Literal["incremental", "full"] = Field(
        default="incremental",
        description="incremental: copy unchanged chunks, embed the rest; full: embed all.",
    )


def adapters_digest(adapters: Iterable[ServedAdapter]) -> str:
    """A short digest of a set of adapters (names and sources), order aside: what the
    operator hands the replicas and what each reports it serves."""
    pairs = sorted((a.name, a.source) for a in adapters)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:12]


class ServedAdapter(TailorModel):
    """An adapter folder resolved by the operator."""

    @property
    def source(self) -> str:
        """What identifies its weights: the artifact URI, else the folder."""
        return self.uri or self.path

    name: str
    path: str = Field(
        description="Where the pod reads it; empty for an s3:// folder outside the run's "
        "artifact store, fetched into the model cache at start."
    )
    uri: str | None = Field(
        default=None,
        description="s3:// artifact: downloaded to path (checked against its upload) at start.",
    )
    sha256: str | None = Field(
        default=None,
        description="sha256 of the artifact's manifest.json as the operator recorded it in "
        "the run's status: the server loads the folder only if it still matches (and every "
        "file matches the manifest), whatever was written beside it since.",
    )


class UpstreamEngineConfig(TailorModel):
    """An OpenAI-compatible token engine the gateway forwards generation to (vLLM in the
    same pod)."""

    url: str = Field(description="Base URL without /v1, e.g. http://127.0.0.1:8001.")
    model: str = Field(description="The upstream's name of the base model.")
    startup_seconds: float = Field(
        default=1800, description="How long the gateway waits for the upstream to serve."
    )
    timeout_seconds: float = Field(default=600, description="Longest wait for the next token.")
    load_adapters: bool = Field(
        default=False,
        description="Load the run's adapters into the upstream through its runtime adapter "
        "API (vLLM's /v1/load_lora_adapter) once it serves; else it serves them itself.",
    )
    max_inflight: int | None = Field(
        default=None,
        ge=1,
        description="Requests the gateway has at the upstream at once, running and waiting "
        "(batching.maxBatchSize + maxQueue); one more is answered 429 at once. Unset: no bound.",
    )


TEST_KEY_HEADER = "X-Tailor-Test-Key"
"""The header that carries a ModelDeployment's test key (ServeRun.test_key_secret_ref)."""


class ServingLimits(TailorModel):
    """What one request to a serving replica may ask for; the cluster admin's (Helm:
    workloads.serving.limits). Past a limit the request is answered 4xx, naming it, before
    any work: no request takes the replica down or starves the others."""

    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body."
    )
    max_messages: int = Field(
        default=256, ge=1, le=100_000, description="Most messages in a chat request."
    )
    max_tokens: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Most completion tokens a request may ask for (max_tokens).",
    )
    template_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="CPU time for rendering a prompt profile a request brings "
        "(tailor.promptProfile), in a process of its own.",
    )
    prepare_seconds: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="Time for preparing a request off the event loop: tokenising it, and "
        "checking and compiling its response_format (past it: 400).",
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Requests one replica handles at once, bodies being received included "
        "(past it: 503 with Retry-After; the probes are not counted).",
    )
    cache_max_entries: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Most response cache entries per replica, whatever a spec's "
        "cache.maxEntries asks.",
    )


def feedback_folder(deployment: str) -> str:
    """Where a ModelDeployment's captured exchanges and feedback live, under its
    namespace's artifacts root (spec.feedback)."""
    return f"feedback/{deployment}"


class Routing(TailorModel):
    """The rollout a replica routes by, written by the operator into the spec file and
    applied in place (a new step or weight: the replica measures anew)."""

    id: str = Field(description="The rollout's id (status.rollout.id).")
    step: int = Field(ge=0, description="The step; len(steps): promoted.")
    weight: int = Field(ge=0, le=100, description="The candidate's weight now (percent).")
    rollout: Rollout
    profiles: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="stable / candidate: the rendered profile (a revision's JSON) of each variant "
        "that names a promptProfileRef; a variant without one answers with the served "
        "profile.",
    )


class ServeRun(RunBase):
    """The spec file of ``tailor.workloads.serving.app``."""

    spec: ModelDeploymentSpec
    served_name: str = Field(description="Base model name clients use (the deployment's name).")
    adapters: list[ServedAdapter] = Field(default_factory=list)
    prompt_profile_file: str | None = Field(default=None, description="Mounted profile JSON.")
    knowledge_base: RetrieverConfig | None = None
    upstream: UpstreamEngineConfig | None = Field(
        default=None,
        description="Generate with this OpenAI-compatible server (vLLM) instead of loading "
        "the model in-process; the gateway keeps prompts, RAG, cache, auth and metrics.",
    )
    adapters_revision: str | None = Field(
        default=None,
        description="The operator's digest of ``adapters``; a replica reports it back once "
        "it serves all of them.",
    )
    adapter_api: bool = Field(
        default=False,
        description="Also serve vLLM's runtime adapter API (/v1/load_lora_adapter, "
        "/v1/unload_lora_adapter), for a gateway in front of this server. Off in pods: it "
        "loads any path it is given.",
    )
    limits: ServingLimits = Field(default_factory=ServingLimits)
    prompt_profile_revision: str | None = Field(
        default=None, description="The served PromptProfile revision (captured exchanges)."
    )
    knowledge_base_version: str | None = Field(
        default=None, description="The served index version (captured exchanges)."
    )
    replica: str | None = Field(
        default=None, description="This replica's name in capture segments (default: HOSTNAME)."
    )
    routing: Routing | None = Field(
        default=None, description="The rollout in progress or promoted (spec.rollout)."
    )
    gated_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters whose FineTuneJob's evaluation gate has not passed, and why: "
        "served only to requests with the test key (its Evaluation's), applied in place.",
    )
    test_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="The key a caller sends (header X-Tailor-Test-Key) to bring its own "
        "prompt profile (tailor.promptProfile): the PromptProfile test Jobs' credential, "
        "created by the operator per ModelDeployment. Unset: no request may bring one.",
    )
    host: str = "0.0.0.0"
    port: int = 8000


RAFT_TRAIN_FILE = "train.jsonl"
RAFT_VALIDATION_FILE = "validation.jsonl"
RAFT_HOLDOUT_FILE = "holdout.jsonl"
"""Files the RAFT data stage writes: the child FineTuneJob trains on the first two, the
evaluation asks the held-out questions."""


class RaftDataRun(RunBase):
    """The spec file of ``tailor.workloads.raft.data``."""

    spec: RAFTJobSpec
    knowledge_base: RetrieverConfig
    output_dir: str
    teacher_url: str | None = Field(default=None, description="Resolved teacher base URL.")


class EvalTarget(TailorModel):
    """An OpenAI-compatible endpoint and the model name to ask."""

    base_url: str = Field(description="e.g. http://md.ns.svc:8000/v1")
    model: str = Field(description="e.g. md or md/adapter")
    context: Literal["protocol", "none"] = Field(
        default="protocol",
        description="protocol: documents as the evaluation protocol says; none: the question "
        "alone (a closed-book baseline such as a domain fine-tune without retrieval).",
    )


class PromptTestRun(RunBase):
    """The spec file of ``tailor.workloads.evaluation.prompt_tests``: one revision's test cases."""

    spec: PromptProfileSpec = Field(description="The profile, with the revision's content.")
    revision: int = Field(description="The revision under test.")
    cases_hash: str = Field(description="Hash of spec.tests.cases (reported back).")
    target: EvalTarget = Field(description="The ModelDeployment (and model) that answers.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="The deployment's API key, when it asks for one."
    )
    test_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="The deployment's test key (ServeRun.test_key_secret_ref)."
    )


class EvaluateRun(RunBase):
    """The spec file of ``tailor.workloads.raft.evaluate``."""

    spec: RAFTJobSpec
    knowledge_base: RetrieverConfig
    dataset_dir: str = Field(description="Output of the data stage (holdout questions).")
    endpoints: dict[str, EvalTarget] = Field(
        default_factory=dict, description="System name (rag, raft) to the endpoint to ask."
    )
    output_dir: str


class CandidateTarget(EvalTarget):
    """Where one Evaluation candidate is asked, resolved by the operator."""

    retrieval: bool = Field(default=True, description="Ask with the deployment's retrieval.")
    devices: float = Field(
        default=1.0, description="Devices the deployment holds (GPUs, else CPU cores)."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="The deployment's API key, when it asks for one."
    )
    prompt_profile: dict[str, Any] | None = Field(
        default=None, description="The rendered PromptProfile revision each request brings."
    )
    prompt_profile_revision: int | None = Field(default=None, description="Its revision.")
    test_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="The deployment's test key (to bring a profile, and to reach an adapter still behind its evaluation gate).",
    )


class EvaluationRun(RunBase):
    """The spec file of ``tailor.workloads.evaluation.measure``."""

    spec: EvaluationSpec
    targets: dict[str, CandidateTarget] = Field(description="Candidate name to its endpoint.")
    judge: CandidateTarget | None = Field(
        default=None, description="scoring.type judge: the judge's resolved endpoint."
    )
    output_dir: str = Field(
        description="answers.jsonl (kept across restarts: a restarted pod asks only what "
        "is missing), report.json and report.png."
    )
