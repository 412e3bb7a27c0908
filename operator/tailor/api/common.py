"""Types shared by every Tailor resource: model and data sources, compute resources,
secret references, conditions and the common status fields.

One vocabulary across kinds: a model is always a ``ModelSource``, data always a
``DataSource``, compute always ``Resources``, a secret always a ``SecretKeyRef``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, WithJsonSchema

from tailor.api.base import Rule, TailorModel, cel_exactly_one, exactly_one

BUILTIN_LANGUAGE_MODELS = ("smollm2-135m-instruct",)
BUILTIN_EMBEDDING_MODELS = ("minilm-l6-v2",)

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a quantity; write e.g. 500m, 4, 16Gi")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
    Field(description="A Kubernetes quantity such as 500m, 2, 16Gi."),
]
"""A Kubernetes resource quantity: an integer or a string like ``500m`` or ``16Gi``."""

FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A JSON object whose content Tailor does not constrain (a JSON schema, an example)."""

Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of an object in the same namespace.",
    ),
]


# Paths a user names are relative and stay under their root: no leading '/', no '..'
# segment (RE2 and Python alike). The workloads check again after resolving symlinks.
_SEGMENT = r"([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+|[.])"
RELATIVE_PATH = f"^({_SEGMENT}(/+{_SEGMENT})*/?)?$"
"""A relative path or glob: segments without '..', no leading '/'."""

OBJECT_KEY = r"^([-_a-zA-Z0-9]|[.][-_a-zA-Z0-9])[-._a-zA-Z0-9]*$"
"""A ConfigMap or Secret key as Kubernetes allows it (letters, digits, '-', '_', '.'; not
'.', '..' or a name starting with '..'): it becomes a file name where the key is mounted."""


def _key_rule(field: str, kind: str) -> Rule:
    cel_field = "".join(w.capitalize() if i else w for i, w in enumerate(field.split("_")))
    return Rule(
        cel=f"!has(self.{cel_field}) || self.{cel_field}.matches('{OBJECT_KEY}')",
        message=f"{cel_field} must be a {kind} key: letters, digits, '-', '_' and '.', not "
        "starting with '..' and without '/'",
        check=lambda m: (
            getattr(m, field) is None or re.match(OBJECT_KEY, getattr(m, field)) is not None
        ),
        field=cel_field,
    )


def _relative_rule(field: str, what: str) -> Rule:
    return Rule(
        cel=f"!has(self.{field}) || self.{field}.matches('{RELATIVE_PATH}')",
        message=f"{field} must be {what} relative to the volume root: no leading '/' and "
        "no '..' segment",
        check=lambda m: re.match(RELATIVE_PATH, getattr(m, field)) is not None,
        field=field,
    )


class LocalObjectRef(TailorModel):
    """A reference to another object in the same namespace, by name."""

    name: Name = Field(description="Name of the referenced object in the same namespace.")


class SecretKeyRef(TailorModel):
    """A key of a Secret in the same namespace. Secret values are never copied into status,
    logs, events or environment dumps; workloads read them from a mounted file."""

    name: Name = Field(description="Name of the Secret in the same namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")

    rules = (_key_rule("key", "Secret"),)


class HuggingFaceModel(TailorModel):
    """A model repository on the Hugging Face Hub (needs network access from the pod)."""

    repo: str = Field(
        min_length=3,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Repository id, org/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.",
    )
    revision: str = Field(
        default="main", max_length=200, description="Branch, tag or commit to load."
    )
    file: str | None = Field(
        default=None,
        max_length=200,
        description="A single .gguf file inside the repository, for GGUF-only repositories.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding an access token for gated or private repos."
    )


class PvcPath(TailorModel):
    """A path on a PersistentVolumeClaim in the same namespace."""

    claim_name: Name = Field(description="Name of the PersistentVolumeClaim.")
    path: str = Field(
        default="",
        max_length=1024,
        description="Path relative to the volume root (no leading '/', no '..').",
    )

    rules: ClassVar[tuple[Rule, ...]] = (_relative_rule("path", "a path"),)


_S3_URI = "s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^.]|[.][^.]|[.][.][^/])+"
_PVC_URI = "pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/([^.]|[.][^.]|[.][.][^/])*)?"
MODEL_URI = (
    "^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    f"|{_S3_URI}|{_PVC_URI})$"
)
"""The model URIs Tailor reads (RE2 and Python alike): no ``..`` path segment."""

DATA_URI = f"^({_S3_URI}|{_PVC_URI})$"
"""The data URIs Tailor reads: an S3 object or folder, or a path on a claim."""


def split_s3_uri(uri: str | None) -> tuple[str, str] | None:
    """(bucket, key) of an ``s3://bucket/key`` uri (the key's slashes kept), else None."""
    if not (uri or "").startswith("s3://"):
        return None
    bucket, _, key = (uri or "")[len("s3://") :].partition("/")
    return bucket, key


def split_pvc_uri(uri: str | None) -> tuple[str, str] | None:
    """(claim, path) of a ``pvc://claim/path`` uri, else None."""
    if not (uri or "").startswith("pvc://"):
        return None
    name, _, path = (uri or "")[len("pvc://") :].partition("/")
    return name, path.strip("/")


class _ModelSource(TailorModel):
    huggingface: HuggingFaceModel | None = Field(
        default=None, description="Load from the Hugging Face Hub."
    )
    pvc: PvcPath | None = Field(
        default=None,
        description="Load from a volume: a Hugging Face format folder or a single .gguf file.",
    )
    uri: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "The model by URI, as KServe names storage: hf://org/name[@revision] (the Hub), "
            "s3://bucket/path/ (a folder Tailor uploaded, e.g. a full fine-tune's artifact; "
            "read with the operator's S3 connection and checked against its upload marker) "
            "or pvc://claim/path."
        ),
    )

    rules = (
        Rule(
            cel=cel_exactly_one("builtin", "huggingface", "pvc", "uri"),
            message="set exactly one of builtin, huggingface, pvc or uri",
            check=lambda m: exactly_one(m, "builtin", "huggingface", "pvc", "uri"),
        ),
        Rule(
            cel=f"!has(self.uri) || self.uri.matches('{MODEL_URI}')",
            message="uri must be hf://org/name[@revision], s3://bucket/path/ or "
            "pvc://claim/path (no '..' segment)",
            check=lambda m: m.uri is None or re.match(MODEL_URI, m.uri) is not None,
            field="uri",
        ),
    )

    @property
    def hub(self) -> HuggingFaceModel | None:
        """The Hub repository, from ``huggingface`` or an ``hf://`` uri."""
        if self.huggingface or not (self.uri or "").startswith("hf://"):
            return self.huggingface
        repo, _, revision = (self.uri or "")[len("hf://") :].partition("@")
        return HuggingFaceModel(repo=repo, revision=revision or "main")

    @property
    def claim(self) -> PvcPath | None:
        """The volume path, from ``pvc`` or a ``pvc://`` uri."""
        parts = split_pvc_uri(self.uri)
        if self.pvc or parts is None:
            return self.pvc
        return PvcPath(claim_name=parts[0], path=parts[1])

    @property
    def s3(self) -> tuple[str, str] | None:
        """(bucket, key of the folder) of an ``s3://`` uri."""
        parts = split_s3_uri(self.uri)
        return (parts[0], parts[1].strip("/")) if parts else None


class ModelSource(_ModelSource):
    """Where a language model comes from: exactly one of builtin, huggingface, pvc or uri."""

    builtin: Literal["smollm2-135m-instruct"] | None = Field(
        default=None,
        description=(
            "A model shipped with Tailor's workload image, available offline: "
            "smollm2-135m-instruct (SmolLM2-135M-Instruct, GGUF)."
        ),
    )


class EmbeddingModelSource(_ModelSource):
    """Where an embedding model comes from: exactly one of builtin, huggingface, pvc or uri."""

    builtin: Literal["minilm-l6-v2"] | None = Field(
        default=None,
        description=(
            "An embedding model shipped with Tailor's workload image, available offline: "
            "minilm-l6-v2 (all-MiniLM-L6-v2, 384 dimensions)."
        ),
    )


class ConfigMapKey(TailorModel):
    """A ConfigMap in the same namespace; one key or, when key is empty, every key as a file."""

    name: Name = Field(description="Name of the ConfigMap.")
    key: str | None = Field(
        default=None,
        max_length=253,
        description="Key to read; omit to read every key of the ConfigMap as a file.",
    )

    rules = (_key_rule("key", "ConfigMap"),)


class PvcFiles(PvcPath):
    """Files on a PersistentVolumeClaim, selected by a glob under a path."""

    glob: str = Field(
        default="**/*",
        max_length=256,
        description="Glob relative to path selecting the files, e.g. **/*.md (no '..').",
    )

    rules = (*PvcPath.rules, _relative_rule("glob", "a glob"))


class FeedbackData(TailorModel):
    """Records a ModelDeployment of this namespace captured (its spec.feedback), joined with
    the ratings on them, as a dataset."""

    deployment_ref: LocalObjectRef = Field(description="The ModelDeployment that captured them.")
    format: Literal["sft", "kto", "dpo", "retrieval"] = Field(
        default="sft",
        description="sft: up-rated answers and corrections as chat examples; kto: {prompt, "
        "completion, label} (TRL's unpaired preference format); dpo: {prompt, chosen, "
        "rejected} (a correction or an up-rated answer against a down-rated one for the "
        "same question); retrieval: {question, document} pairs for a KnowledgeBase's "
        "spec.adaptation (a cited document marked useful, or cited by an up-rated answer).",
    )
    since: datetime | None = Field(default=None, description="Exchanges from this time on.")
    until: datetime | None = Field(default=None, description="Exchanges before this time.")
    min_records: int = Field(
        default=1,
        ge=1,
        le=10_000_000,
        description="Fail (FeedbackTooSmall) with fewer records than this after filtering.",
    )
    held_out_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of questions (chosen by a hash of the question, the same in "
        "every dataset) kept out of training for evaluations.",
    )
    split: Literal["train", "heldOut"] = Field(
        default="train", description="train: every exchange but the held-out share; heldOut: it."
    )
    exclude_questions: ConfigMapKey | None = Field(
        default=None,
        description="An evaluation set (JSON lines or a JSON array of {question} or chat "
        "records) whose questions are never in this dataset: what is measured on them is "
        "not learned from them (an AdaptationLoop's frozen set).",
    )


class DataSource(TailorModel):
    """Where data comes from: exactly one of configMap, pvc, uri, url, inline or feedback."""

    config_map: ConfigMapKey | None = Field(
        default=None, description="Small files stored in a ConfigMap (up to 1 MiB in all)."
    )
    pvc: PvcFiles | None = Field(default=None, description="Files on a PersistentVolumeClaim.")
    uri: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "Data by URI: s3://bucket/key (one object) or s3://bucket/folder/ (every object "
            "under it), read with the operator's S3 connection (artifacts.s3 in the Helm "
            "values) and checked against Tailor's upload marker when the folder has one; "
            "or pvc://claim/path (a file, or every file of a folder)."
        ),
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description=(
            "An https URL fetched by the workload. Private, loopback and link-local "
            "addresses are refused unless allowPrivateAddresses is true; plain http "
            "needs allowInsecureHttp."
        ),
    )
    inline: list[FreeForm] | None = Field(
        default=None,
        max_length=1000,
        description=(
            "Records written directly in the manifest (tiny datasets, tests): chat examples "
            "{messages: [...]}, {prompt, completion} pairs, or documents {id, text, metadata}."
        ),
    )
    feedback: FeedbackData | None = Field(
        default=None,
        description="Exchanges a ModelDeployment captured and the feedback on them "
        "(records, for training and evaluation data; not documents).",
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Allow url to resolve to private, loopback or link-local addresses.",
    )
    allow_insecure_http: bool = Field(
        default=False, description="Allow a plain http:// url (https is required otherwise)."
    )
    max_bytes: int = Field(
        default=100 * 1024 * 1024,
        gt=0,
        le=10 * 1024**3,
        description="Largest download accepted from url, in bytes.",
    )

    rules = (
        Rule(
            cel=cel_exactly_one("configMap", "pvc", "uri", "url", "inline", "feedback"),
            message="set exactly one of configMap, pvc, uri, url, inline or feedback",
            check=lambda m: exactly_one(m, "config_map", "pvc", "uri", "url", "inline", "feedback"),
        ),
        Rule(
            cel=f"!has(self.uri) || self.uri.matches('{DATA_URI}')",
            message="uri must be s3://bucket/key, s3://bucket/folder/ or pvc://claim/path "
            "(no '..' segment)",
            check=lambda m: m.uri is None or re.match(DATA_URI, m.uri) is not None,
            field="uri",
        ),
        Rule(
            cel="!has(self.url) || self.url.startsWith('https://') || self.allowInsecureHttp",
            message="url must use https://, or set allowInsecureHttp: true",
            field="url",
            check=lambda m: m.url is None or m.url.startswith("https://") or m.allow_insecure_http,
        ),
    )

    @property
    def files(self) -> PvcFiles | None:
        """The claim's files, from ``pvc`` or a ``pvc://`` uri (a file, or a folder's files)."""
        parts = split_pvc_uri(self.uri)
        if self.pvc or parts is None:
            return self.pvc
        return PvcFiles(claim_name=parts[0], path=parts[1])

    @property
    def s3(self) -> tuple[str, str] | None:
        """(bucket, key) of an ``s3://`` uri; a key ending in / names a folder."""
        return split_s3_uri(self.uri)


class Toleration(TailorModel):
    """A Kubernetes toleration (see `kubectl explain pod.spec.tolerations`)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class Resources(TailorModel):
    """Compute for a workload: accelerators, CPU, memory and placement."""

    gpus: int = Field(default=0, ge=0, le=64, description="Accelerators per node (0 for CPU).")
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^([a-z0-9.-]+/)?[a-z0-9A-Z._-]+$",
        description="Extended resource name of the accelerator, e.g. nvidia.com/gpu, amd.com/gpu.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. 4 or 500m.")
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit, e.g. 16Gi."
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels the pods must match, e.g. nvidia.com/gpu.product."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Taints the pods tolerate (GPU node pools)."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Nodes for distributed training (torchrun, one pod per node).",
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(TailorModel):
    """The standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Ready, Succeeded, Progressing.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="One CamelCase word for machines.")
    message: str = Field(default="", description="What happened, for people.")
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When status last changed.",
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was computed from."
    )


QueueName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Name of a Kueue LocalQueue in the run's namespace.",
    ),
]


class Queueing(TailorModel):
    """Joining a Kueue queue (kueue.x-k8s.io): the run's training Job is created suspended
    with the queue's label, and Kueue starts it when the queue's ClusterQueue has quota."""

    queue_name: QueueName | None = Field(
        default=None,
        description="Kueue LocalQueue the training Job joins (label kueue.x-k8s.io/queue-name); "
        "Kueue admits it when its ClusterQueue has quota for all its pods, and may preempt "
        "it for higher-priority work (it then resumes from its newest checkpoint). Unset: "
        "the operator's default queue (Helm: kueue.defaultQueue), else no queue.",
    )
    priority_class_name: Name | None = Field(
        default=None,
        description="Kueue WorkloadPriorityClass of the run (label "
        "kueue.x-k8s.io/priority-class): its order in the queue and which runs it may "
        "preempt. Needs a queue. Not the pods' PriorityClass (resources.priorityClassName).",
    )


class QueueStatus(TailorModel):
    """Where a queued run stands in Kueue."""

    name: str | None = Field(default=None, description="The LocalQueue.")
    cluster_queue: str | None = Field(default=None, description="Its ClusterQueue.")
    workload: str | None = Field(default=None, description="Kueue's Workload of the run.")
    position: int | None = Field(
        default=None,
        description="Place in the LocalQueue while waiting (1: next), from Kueue's visibility API.",
    )
    priority: int | None = Field(default=None, description="The Workload's priority.")
    admitted: bool | None = Field(default=None, description="Kueue has admitted the run.")
    admitted_at: str | None = Field(default=None, description="When it was last admitted.")
    waiting_since: str | None = Field(
        default=None, description="Since when it waits (unset while admitted)."
    )
    preemptions: int | None = Field(default=None, description="Times it was preempted.")


class StatusBase(TailorModel):
    """Fields every Tailor status has."""

    model_config = TailorModel.model_config | {"extra": "ignore"}

    phase: str | None = Field(default=None, description="Where the resource is in its lifecycle.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Standard conditions (Ready, Succeeded, ...)."
    )


class Artifact(TailorModel):
    """A published artifact: an adapter, model weights or a dataset, with its checksum."""

    uri: str = Field(description="Where it lives, e.g. pvc://tailor-artifacts/finetunejob/x/uid/.")
    sha256: str | None = Field(default=None, description="sha256 of manifest.json.")
    size_bytes: int | None = Field(default=None, description="Total size of the files.")


class Teacher(TailorModel):
    """An OpenAI-compatible model that writes questions and answers."""

    deployment_ref: LocalObjectRef | None = Field(
        default=None, description="A ModelDeployment in this namespace."
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Base URL of an external OpenAI-compatible API, e.g. https://api.example/v1.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key for url."
    )
    model: str | None = Field(default=None, max_length=200, description="Model name to request.")
    allow_private_addresses: bool = Field(
        default=False,
        description="Allow url to resolve to private, loopback or link-local addresses "
        "(including IPv4 addresses embedded in IPv6: NAT64, 6to4, mapped).",
    )
    allow_insecure_http: bool = Field(
        default=False, description="Allow a plain http:// url (https is required otherwise)."
    )

    rules = (
        Rule(
            cel=cel_exactly_one("deploymentRef", "url"),
            message="set exactly one of deploymentRef or url",
            check=lambda m: exactly_one(m, "deployment_ref", "url"),
        ),
        Rule(
            cel="!has(self.url) || self.url.startsWith('https://') || self.allowInsecureHttp",
            message="url must use https://, or set allowInsecureHttp: true",
            field="url",
            check=lambda m: m.url is None or m.url.startswith("https://") or m.allow_insecure_http,
        ),
    )
