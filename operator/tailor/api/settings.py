"""Operator settings: what the builders need to know about the installation.

Read from ``TAILOR_*`` environment variables (the Helm chart sets them), so one operator
image serves every cluster: workload image, artifacts volume, runtime and ports.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tailor.api.base import TailorModel
from tailor.api.common import Quantity
from tailor.api.workloads import ServingLimits


class ScratchLimits(TailorModel):
    """sizeLimit of each emptyDir a workload pod writes (Helm: workloads.scratch). Containers
    have read-only root filesystems, so these bound a pod's use of the node's disk: past a
    limit the kubelet evicts the pod, before it fills the disk under other tenants' pods."""

    tmp: Quantity = Field(default="10Gi", description="/tmp of every workload pod.")
    artifacts: Quantity = Field(
        default="200Gi",
        description="The s3 store's local mirror (checkpoints, the artifact before upload).",
    )
    cache: Quantity = Field(
        default="100Gi", description="The model cache (when no claim is set for it)."
    )
    vllm: Quantity = Field(default="100Gi", description="vLLM's own cache (compiled kernels).")


class PodPolicy(TailorModel):
    """Defaults and allow-lists for workload pods (Helm: workloads.pods): what a spec leaves
    out is bounded anyway, and what it may ask of the scheduler is the admin's to allow."""

    default_cpu: Quantity | None = Field(
        default="2",
        description="CPU request and limit of a workload container whose spec sets none "
        '("" or null: none). Counts against a Kueue ClusterQueue\'s quota like any request.',
    )
    default_memory: Quantity | None = Field(
        default="8Gi",
        description="Memory request and limit of a workload container whose spec sets none "
        '("" or null: none): past it the container is OOM-killed, not its neighbours.',
    )

    @field_validator("default_cpu", "default_memory", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # Helm drops a null value: "" says none

    allowed_priority_classes: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="PriorityClasses a spec's resources.priorityClassName may name (empty: "
        "none, so no tenant can preempt others with system-node-critical).",
    )
    allowed_toleration_keys: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu", "amd.com/gpu"],
        max_length=64,
        description="Taint keys a spec's resources.tolerations may tolerate (a toleration "
        "without a key tolerates every taint, and is refused unless '*' is listed).",
    )


class EgressPolicy(TailorModel):
    """Where pods may be sent by a spec's URLs (a DataSource's url, a RAFT teacher's url, a
    KnowledgeBase's Qdrant url): the cluster admin's (Helm: workloads.egress). A user's
    fields can only narrow it: allowPrivateAddresses or allowInsecureHttp in a spec is
    refused unless the admin allows it here."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Hosts a URL may name: exact names, or '.example.com' for a domain and its "
        "subdomains. Empty: any host (the URL guard still refuses private addresses).",
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Let specs set allowPrivateAddresses (in-cluster or cloud-internal hosts, "
        "which include the cloud metadata service).",
    )
    allow_insecure_http: bool = Field(
        default=False, description="Let specs set allowInsecureHttp (plain http URLs)."
    )


class WorkloadEgress(TailorModel):
    """An egress NetworkPolicy beside every workload (Helm: workloads.networkPolicy.egress):
    its pods may reach DNS, pods of their own namespace and what the admin lists, nothing
    else. Off by default: what workloads need (the API server for their status, the S3
    endpoint, Qdrant, the Hub, a teacher) differs per cluster and only the admin knows it."""

    enabled: bool = Field(default=False, description="Write the egress NetworkPolicies.")
    allow: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        description="More NetworkPolicy egress rules ({to: [...], ports: [...]}), e.g. an "
        "ipBlock for the API server's address on 443 and one for the S3 endpoint.",
    )


class NetworkPolicySettings(TailorModel):
    """NetworkPolicies the operator writes (Helm: workloads.networkPolicy)."""

    enabled: bool = Field(
        default=True,
        description="A NetworkPolicy per ModelDeployment admitting only its spec.network."
        "allowFrom on the API port and metricsFromNamespaces on the metrics port.",
    )
    metrics_from_namespaces: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="Namespaces whose pods may reach a server's metrics port: Prometheus's "
        "and the operator's (it reads each replica's /adapters there). The chart adds its "
        "own namespace.",
    )
    egress: WorkloadEgress = Field(
        default_factory=WorkloadEgress,
        description="An egress NetworkPolicy beside every workload (off by default).",
    )


class OperatorSettings(TailorModel):
    """How this installation runs workloads."""

    runtime: Literal["kubernetes", "local"] = Field(
        default="kubernetes",
        description="kubernetes: Jobs and Deployments; local: processes on the operator's host.",
    )
    image: str = Field(
        default="localhost/tailor-workloads:0.1.0",
        description="Image of the workload programs (CPU or CUDA variant).",
    )
    gpu_image: str | None = Field(
        default=None,
        description="Image of workload pods that request GPUs (the CUDA variant); unset: image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    artifacts_pvc: str = Field(
        default="tailor-artifacts", description="Per-namespace artifacts volume claim."
    )
    artifacts_size: str = Field(default="50Gi", description="Size of a created artifacts volume.")
    artifacts_storage_class: str | None = Field(default=None, description="Its storage class.")
    artifacts_access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce",
        description="Access mode of a created artifacts volume: ReadWriteMany (with a class "
        "that supports it) lets multi-node training and replicas on several nodes share it.",
    )
    create_artifacts_pvc: bool = Field(
        default=True, description="Create the artifacts volume in a namespace when missing."
    )
    artifacts_mount: str = Field(default="/artifacts", description="Mount path in pods.")
    artifacts_store: Literal["pvc", "s3"] = Field(
        default="pvc",
        description="pvc: artifacts on the namespace's claim (ReadWriteMany when pods of one "
        "run or deployment can land on several nodes); s3: in an S3-compatible bucket, each "
        "pod working in its own scratch folder.",
    )
    s3_bucket: str = Field(default="", description="s3 store: the bucket.")
    s3_prefix: str = Field(default="tailor", description="s3 store: key prefix.")
    s3_endpoint: str | None = Field(
        default=None, description="s3 store: endpoint URL (MinIO, Ceph, GCS, SeaweedFS)."
    )
    s3_region: str = Field(default="us-east-1", description="s3 store: region.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="path", description="s3 store: path or virtual-host addressing."
    )
    s3_secret: str | None = Field(
        default=None,
        description="s3 store: Secret (in each namespace) with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY; unset: the pods' own credentials (IRSA, workload identity).",
    )
    s3_shared_readable: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="s3:// folders every namespace's specs may read (e.g. a team's published "
        "base models), each s3://bucket/ or s3://bucket/prefix/. Besides these, a spec may "
        "read only its own namespace's prefix, s3://<bucket>/<prefix>/<namespace>/ (Helm: "
        "artifacts.s3.sharedReadable; TAILOR_S3_SHARED_READABLE as JSON).",
    )
    require_pinned_revisions: bool = Field(
        default=False,
        description="Refuse a Hugging Face model named by branch or tag: every Hub source "
        "must name a 40-digit commit (Helm: workloads.huggingface.requirePinnedRevisions).",
    )
    model_cache_claim: str | None = Field(
        default=None,
        description="A claim (in each namespace that runs workloads) mounted as every "
        "workload pod's cache folder: the Hub's cache (keyed by repo, revision and file "
        "hash), converted GGUF weights and s3:// models, each fetched once and shared by "
        "the pods that mount it (ReadWriteMany: across nodes). Unset: a cache per pod.",
    )
    serve_port: int = Field(default=8000, description="Port of the OpenAI-compatible servers.")
    metrics_port: int = Field(default=9090, description="Prometheus port of workload pods.")
    progress_interval_seconds: float = Field(
        default=5.0, ge=0, description="Least time between two progress patches of a workload."
    )
    run_as_user: int = Field(default=1000, description="UID of workload containers.")
    workers: int = Field(
        default=16, ge=1, description="Threads that run reconciles off the operator's work queue."
    )
    cleanup_timeout_seconds: float = Field(
        default=600.0,
        ge=0,
        description="How long a KnowledgeBase's deletion retries removing its collections "
        "(e.g. Qdrant unreachable) before it lets the object go and names what was left.",
    )
    resync_seconds: float = Field(
        default=300.0,
        ge=0,
        description="Every so often each unfinished resource is reconciled again even without "
        "an event (0: never).",
    )
    vllm_image: str = Field(
        default="docker.io/vllm/vllm-openai:v0.11.0",
        description="Image of the vLLM server of ModelDeployments with engine vllm "
        "(Helm: workloads.vllm.image).",
    )
    default_queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kueue LocalQueue that FineTuneJobs and RAFTJobs without spec.queueName "
        "join, looked up in each run's own namespace (Helm: kueue.defaultQueue).",
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations on every workload pod, e.g. sidecar.istio.io/inject: "
        '"false" (Helm: workloads.podAnnotations; TAILOR_POD_ANNOTATIONS as JSON).',
    )
    egress: EgressPolicy = Field(
        default_factory=EgressPolicy,
        description="Where specs may send pods (Helm: workloads.egress; TAILOR_EGRESS as JSON).",
    )
    pods: PodPolicy = Field(
        default_factory=PodPolicy,
        description="Workload pods' default CPU and memory, allowed priority classes and "
        "tolerations (Helm: workloads.pods; TAILOR_PODS as JSON).",
    )
    scratch: ScratchLimits = Field(
        default_factory=ScratchLimits,
        description="sizeLimit of workload pods' emptyDirs (Helm: workloads.scratch; "
        "TAILOR_SCRATCH as JSON).",
    )
    network_policy: NetworkPolicySettings = Field(
        default_factory=NetworkPolicySettings,
        description="NetworkPolicies of servers (Helm: workloads.networkPolicy; "
        "TAILOR_NETWORK_POLICY as JSON).",
    )
    serving_limits: ServingLimits = Field(
        default_factory=ServingLimits,
        description="Per-request limits of every serving replica (Helm: "
        "workloads.serving.limits; TAILOR_SERVING_LIMITS as JSON).",
    )
    local_state_dir: str = Field(
        default="", description="local runtime: where volumes, logs and processes live."
    )

    @model_validator(mode="after")
    def _store_complete(self) -> OperatorSettings:
        if self.artifacts_store == "s3" and not self.s3_bucket:
            raise ValueError(
                "artifactsStore s3 needs s3Bucket (TAILOR_S3_BUCKET; Helm: artifacts.s3.bucket)"
            )
        return self

    @model_validator(mode="after")
    def _shared_folders(self) -> OperatorSettings:
        for entry in self.s3_shared_readable:
            if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/.][^/]*/)*", entry) or (
                "/../" in entry or "/./" in entry
            ):
                raise ValueError(
                    f"s3SharedReadable: {entry!r} must be an s3://bucket/ or "
                    "s3://bucket/folder/ URI ending in / (Helm: artifacts.s3.sharedReadable)"
                )
        return self

    def for_store(self, store: str | None) -> OperatorSettings:
        """These settings with a run's own artifact store (``spec.output.store``)."""
        if store is None or store == self.artifacts_store:
            return self
        return self.model_copy(update={"artifacts_store": store})

    def store_problem(self, field: str) -> str | None:
        """Why a run's s3 store cannot work here (no S3 connection), naming ``field``."""
        if self.artifacts_store == "s3" and not self.s3_bucket:
            return (
                f"{field} is s3 but the operator has no S3 connection: set artifacts.s3.bucket, "
                "artifacts.s3.endpoint and artifacts.s3.secret in the Helm values "
                f"(TAILOR_S3_BUCKET, ...), or remove {field} to use the cluster's store"
            )
        return None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        """Settings from ``TAILOR_<FIELD>`` variables (e.g. TAILOR_IMAGE, TAILOR_RUNTIME)."""
        env = os.environ if environ is None else environ
        values = {}
        for name in cls.model_fields:
            key = f"TAILOR_{name.upper()}"
            if key in env:
                text = env[key]
                values[name] = (
                    json.loads(text)
                    if name
                    in (
                        "pod_annotations",
                        "serving_limits",
                        "scratch",
                        "egress",
                        "s3_shared_readable",
                        "network_policy",
                        "pods",
                    )
                    else text
                )
        return cls.model_validate(values)
