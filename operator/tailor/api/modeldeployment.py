"""ModelDeployment: an OpenAI-compatible server for a base model plus any number of
adapters, with an optional PromptProfile, RAG over a KnowledgeBase, quantization, a
response cache and autoscaling.

Clients pick a model with OpenAI's ``model`` field: ``<deployment>`` for the base model,
``<deployment>/<adapter>`` for an adapter.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel, cel_exactly_one, exactly_one
from tailor.api.common import (
    LocalObjectRef,
    ModelSource,
    PvcPath,
    Resources,
    SecretKeyRef,
    StatusBase,
)
from tailor.api.rollout import ADAPTER_NAME, Rollout, RolloutStatus


class Adapter(TailorModel):
    """A LoRA adapter served beside the base model."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME,
        description="Name clients use: model=<deployment>/<name>.",
    )
    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="A FineTuneJob whose adapter to serve (waits for success)."
    )
    raft_job_ref: LocalObjectRef | None = Field(
        default=None, description="A RAFTJob whose adapter to serve (waits for success)."
    )
    pvc: PvcPath | None = Field(default=None, description="A PEFT adapter folder on a volume.")
    serve_without_gate: bool = Field(
        default=False,
        description="Serve it to everyone even though its FineTuneJob's evaluation gate has "
        "not passed (by default such an adapter answers Evaluations only).",
    )

    rules = (
        Rule(
            cel=cel_exactly_one("fineTuneJobRef", "raftJobRef", "pvc"),
            message="set exactly one of fineTuneJobRef, raftJobRef or pvc",
            check=lambda m: exactly_one(m, "fine_tune_job_ref", "raft_job_ref", "pvc"),
        ),
    )


class KnowledgeBaseBinding(TailorModel):
    """Retrieval-augmented generation over a KnowledgeBase."""

    name: str = Field(min_length=1, max_length=253, description="The KnowledgeBase.")
    top_k: int | None = Field(
        default=None, ge=1, le=100, description="Chunks per query (default: the KB's)."
    )
    score_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="Lowest similarity (default: the KB's)."
    )


class Cache(TailorModel):
    """Exact-match response cache (model, messages and parameters), one per caller: an
    answer is found again only for the API key that asked (all callers are one without
    auth). The cluster admin caps its entries (workloads.serving.limits.cacheMaxEntries)."""

    enabled: bool = Field(default=True, description="Cache deterministic responses.")
    ttl_seconds: int = Field(default=600, ge=1, description="Entry lifetime.")
    max_entries: int = Field(
        default=10000,
        ge=1,
        le=100_000,
        description="Entries kept (at most the cluster admin's cacheMaxEntries).",
    )


AdapterName = Annotated[str, Field(min_length=1, max_length=63, pattern=ADAPTER_NAME)]


class ScopedKey(TailorModel):
    """An API key that may use only the models it lists."""

    secret_ref: SecretKeyRef = Field(description="Secret key holding the API key.")
    adapters: list[AdapterName] = Field(
        default_factory=list,
        max_length=32,
        description="Adapters it may use (model=<deployment>/<adapter>).",
    )
    base_model: bool = Field(default=False, description="It may use the base model too.")

    rules = (
        Rule(
            cel="(has(self.adapters) && size(self.adapters) > 0) || "
            "(has(self.baseModel) && self.baseModel)",
            message="a scoped key grants nothing: list the adapters it may use, or set "
            "baseModel: true (a key for every model is auth.apiKeySecretRef)",
            field="adapters",
            check=lambda m: bool(m.adapters) or m.base_model,
        ),
    )


class Auth(TailorModel):
    """Bearer-token authentication of clients: a key for every model, keys scoped to some
    models, or both. A key is sent as ``Authorization: Bearer <key>``."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key for every model."
    )
    keys: list[ScopedKey] = Field(
        default_factory=list,
        max_length=64,
        description="API keys each limited to some models; any other model is 403.",
    )

    rules = (
        Rule(
            cel="has(self.apiKeySecretRef) || (has(self.keys) && size(self.keys) > 0)",
            message="auth needs a key: set apiKeySecretRef (every model) or keys (scoped "
            "keys), or remove auth",
            field="apiKeySecretRef",
            check=lambda m: m.api_key_secret_ref is not None or bool(m.keys),
        ),
    )


class NetworkPeer(TailorModel):
    """Pods that may call a deployment's API: every pod of a namespace, or those with some
    labels (a NetworkPolicy peer)."""

    namespace: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A namespace by name; unset: the deployment's own.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=16,
        description="Only pods with all these labels; empty: every pod of the namespace.",
    )


class Network(TailorModel):
    """Who may reach the deployment (a NetworkPolicy the operator writes beside it; it is
    enforced where the cluster's network plugin enforces NetworkPolicies)."""

    allow_from: list[NetworkPeer] = Field(
        default_factory=lambda: [NetworkPeer()],
        max_length=32,
        description="Pods that may call the API port. Default: every pod of this namespace "
        "(`[{}]`); a list replaces it (keep `{}` in it for this namespace). Prometheus and "
        "the operator reach the metrics port only (the cluster admin's "
        "workloads.networkPolicy).",
    )


class Autoscaling(TailorModel):
    """HorizontalPodAutoscaler on in-flight requests per replica."""

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_inflight_requests: int = Field(
        default=8, ge=1, le=10000, description="In-flight requests per replica to aim for."
    )

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            field="minReplicas",
            check=lambda m: m.min_replicas <= m.max_replicas,
        ),
    )


class Batching(TailorModel):
    """Dynamic batching of concurrent requests."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Requests per batch.")
    max_queue: int = Field(
        default=256, ge=1, le=100000, description="Waiting requests before 429 Too Many Requests."
    )


def _compiles(patterns: list[str]) -> bool:
    try:
        for pattern in patterns:
            re.compile(pattern)
    except re.error:
        return False
    return True


class Redaction(TailorModel):
    """What is replaced before a captured exchange or a feedback record is written."""

    emails: bool = Field(default=True, description="Replace e-mail addresses with [EMAIL].")
    phone_numbers: bool = Field(
        default=True, description="Replace phone numbers (7 or more digits) with [PHONE]."
    )
    patterns: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=32,
        description="More regular expressions (RE2 syntax: no lookaround or backreferences) "
        "whose matches are replaced with [REDACTED], e.g. account numbers.",
    )

    rules = (
        Rule(
            cel="!has(self.patterns) || self.patterns.all(p, 'x'.matches(p) == 'x'.matches(p))",
            # no field: a regex that does not compile is an evaluation error, which the API
            # server reports at this object whatever fieldPath says
            message="every redact.patterns entry must be a valid RE2 regular expression",
            check=lambda m: _compiles(m.patterns),
        ),
    )


class Rotation(TailorModel):
    """When an open capture segment is closed and published (whichever comes first). What
    a killed pod can lose is the open segment: at most this much."""

    max_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=64 * 1024,
        le=1024**3,
        description="Close a segment at this size.",
    )
    max_seconds: int = Field(
        default=300, ge=5, le=86400, description="Close a segment this long after it opened."
    )


class Feedback(TailorModel):
    """Capture of answered exchanges and the feedback on them (POST /v1/feedback), as
    append-only JSONL segments in the namespace's artifacts store under
    feedback/<deployment>/, for datasets (a DataSource's feedback) and metrics."""

    sample_rate: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of exchanges captured, chosen by response id (the same on every "
        "replica); feedback on an exchange not captured is counted but not kept.",
    )
    retention_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="Segments older than this are deleted; feedback on older ids is a 404.",
    )
    redact: Redaction = Field(
        default_factory=Redaction, description="Replaced before anything is written."
    )
    rotate: Rotation = Field(default_factory=Rotation, description="Segment size and age.")


_VLLM_LOADS = (
    "(!has(self.baseModel.builtin) && "
    "!(has(self.baseModel.uri) && self.baseModel.uri.startsWith('s3://')))"
)


def _vllm_loads(model: ModelSource) -> bool:
    """Whether vLLM can load the base model itself (a Hub repo or a folder on a claim)."""
    return model.hub is not None or model.claim is not None


_GGUF = (
    "(has(self.baseModel.builtin) || "
    "(has(self.baseModel.pvc) && self.baseModel.pvc.path.endsWith('.gguf')) || "
    "(has(self.baseModel.uri) && self.baseModel.uri.startsWith('pvc://') && "
    "self.baseModel.uri.endsWith('.gguf')))"
)
GGUF_TYPES = ("f16", "q8_0", "q4_k_m", "q4_0")
"""Quantizations that are GGUF types (the llama.cpp engine's)."""


def _gguf(model: ModelSource) -> bool:
    """Whether the base model is a GGUF file (the builtin one, or a .gguf on a claim)."""
    claim = model.claim
    return model.builtin is not None or (claim is not None and claim.path.endswith(".gguf"))


class ModelDeploymentSpec(TailorModel):
    """An OpenAI-compatible model server."""

    base_model: ModelSource = Field(description="The base model.")
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="LoRA adapters, chosen per request by model=<deployment>/<adapter>.",
    )
    prompt_profile_ref: LocalObjectRef | None = Field(
        default=None, description="The PromptProfile applied to every request."
    )
    knowledge_base_ref: KnowledgeBaseBinding | None = Field(
        default=None, description="Retrieval over a KnowledgeBase."
    )
    engine: Literal["auto", "builtin", "vllm", "llamacpp"] = Field(
        default="auto",
        description="What generates tokens behind Tailor's gateway (prompts, RAG, cache, "
        "auth and metrics are the gateway's with any): builtin, Tailor's engine in the "
        "server process (transformers + PEFT; CPU or one GPU); llamacpp, llama.cpp's "
        "kernels in the server process under Tailor's scheduler (CPU; a GGUF base model: "
        "builtin or a .gguf on a claim; LoRA adapters converted to GGUF once); vllm, a vLLM "
        "OpenAI server beside it in the pod (GPUs only; tensor parallel over "
        "resources.gpus, LoRA adapters, prefix caching; base model from huggingface or "
        "pvc); auto, vllm when resources.gpus > 0 and the base model is not builtin, "
        "llamacpp on CPU for a GGUF base model, else builtin.",
    )
    quantization: Literal["none", "int8", "nf4", "f16", "q8_0", "q4_k_m", "q4_0"] = Field(
        default="none",
        description="none (llamacpp: the GGUF file as it is); int8 (builtin engine: CPU "
        "dynamic int8, GPU bitsandbytes 8-bit; vllm: fp8 weights; llamacpp: q8_0); nf4 (GPU "
        "only; builtin: bitsandbytes NF4; vllm: bitsandbytes 4-bit, NF4); f16, q8_0, q4_k_m, q4_0 "
        "(llamacpp only: GGUF types, converted once from the model's float weights and "
        "cached; q4_0 runs batches fastest on CPU).",
    )
    max_context_tokens: int | None = Field(
        default=None, ge=128, le=1048576, description="Context window (default: the model's)."
    )
    cache: Cache = Field(default_factory=Cache, description="Response cache.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic batching.")
    auth: Auth | None = Field(default=None, description="Require an API key.")
    network: Network = Field(
        default_factory=Network,
        description="Who may reach the server (default: pods of this namespace).",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Replicas without autoscaling; 0 scales the server to zero (phase Idle).",
    )
    autoscaling: Autoscaling | None = Field(default=None, description="Scale on load.")
    feedback: Feedback | None = Field(
        default=None,
        description="Capture answered exchanges and the feedback on them, for datasets that "
        "learn from use (a DataSource's feedback). Unset: feedback is counted, nothing kept.",
    )
    rollout: Rollout | None = Field(
        default=None,
        description="Roll a candidate adapter out against the stable one (canary or "
        "shadow), measured in the gateway, promoted or rolled back by itself.",
    )
    resources: Resources = Field(default_factory=Resources, description="Compute per replica.")

    rules = (
        Rule(
            cel="!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            field="adapters",
            check=lambda m: len({a.name for a in m.adapters}) == len(m.adapters),
        ),
        Rule(
            cel="self.quantization != 'nf4' || (has(self.resources) && self.resources.gpus > 0)",
            message="nf4 needs a CUDA GPU: set resources.gpus >= 1, or use int8 on CPU",
            field="quantization",
            check=lambda m: m.quantization != "nf4" or m.resources.gpus > 0,
        ),
        Rule(
            cel="self.engine != 'vllm' || (has(self.resources) && self.resources.gpus > 0)",
            message="engine vllm runs on GPUs: set resources.gpus >= 1, or use engine builtin",
            field="engine",
            check=lambda m: m.engine != "vllm" or m.resources.gpus > 0,
        ),
        Rule(
            cel=f"self.engine != 'vllm' || {_VLLM_LOADS}",
            message="engine vllm loads huggingface or pvc models; a builtin or s3:// model is "
            "served by engine builtin",
            field="engine",
            check=lambda m: m.engine != "vllm" or _vllm_loads(m.base_model),
        ),
        Rule(
            cel="self.engine != 'llamacpp' || !has(self.resources) || self.resources.gpus == 0",
            message="engine llamacpp runs on CPU: set resources.gpus to 0, or use engine "
            "builtin or vllm on GPUs",
            field="engine",
            check=lambda m: m.engine != "llamacpp" or m.resources.gpus == 0,
        ),
        Rule(
            cel=f"self.engine != 'llamacpp' || {_GGUF}",
            message="engine llamacpp serves GGUF models: the builtin model, or a .gguf file "
            "on a claim (pvc.path or pvc:// uri); use engine builtin for other models",
            field="engine",
            check=lambda m: m.engine != "llamacpp" or _gguf(m.base_model),
        ),
        Rule(
            cel=f"!(self.quantization in {list(GGUF_TYPES)}) || self.engine == 'llamacpp' || "
            f"(self.engine == 'auto' && (!has(self.resources) || self.resources.gpus == 0) && "
            f"{_GGUF})",
            message="quantization f16, q8_0, q4_k_m and q4_0 are GGUF types: set engine llamacpp "
            "(a GGUF model on CPU), or use none or int8",
            field="quantization",
            check=lambda m: m.quantization not in GGUF_TYPES or m.resolved_engine() == "llamacpp",
        ),
        Rule(
            cel="!has(self.resources) || self.resources.gpus <= 1 || self.engine == 'vllm' || "
            f"(self.engine == 'auto' && {_VLLM_LOADS})",
            message="the builtin engine uses one GPU: set resources.gpus to 1, or serve a "
            "huggingface or pvc model with engine vllm (tensor parallel over all the GPUs)",
            field="resources.gpus",
            check=lambda m: m.resources.gpus <= 1 or m.resolved_engine() == "vllm",
        ),
        *(
            Rule(
                cel=f"!has(self.rollout) || !has(self.rollout.{path}) || "
                f"!has(self.rollout.{path}.adapter) || (has(self.adapters) && "
                f"self.adapters.exists(a, a.name == self.rollout.{path}.adapter))",
                message=f"rollout.{path}.adapter must name an adapter of spec.adapters",
                field=f"rollout.{path}.adapter",
                check=lambda m, path=path: _rollout_adapter_served(m, path),
            )
            for path in ("stable", "candidate", "analysis.judge")
        ),
        Rule(
            cel="!has(self.rollout) || has(self.knowledgeBaseRef) || "
            "(!has(self.rollout.candidate.knowledgeBaseVersion) && "
            "(!has(self.rollout.stable) || !has(self.rollout.stable.knowledgeBaseVersion)))",
            message="a rollout variant's knowledgeBaseVersion is a version of "
            "spec.knowledgeBaseRef: set knowledgeBaseRef, or remove knowledgeBaseVersion",
            field="rollout.candidate.knowledgeBaseVersion",
            check=lambda m: (
                m.rollout is None
                or m.knowledge_base_ref is not None
                or (
                    m.rollout.candidate.knowledge_base_version is None
                    and m.rollout.stable.knowledge_base_version is None
                )
            ),
        ),
    )

    def resolved_engine(self) -> Literal["builtin", "vllm", "llamacpp"]:
        """The engine ``auto`` stands for here."""
        if self.engine != "auto":
            return self.engine
        if self.resources.gpus > 0:
            return "vllm" if _vllm_loads(self.base_model) else "builtin"
        return "llamacpp" if _gguf(self.base_model) else "builtin"


def _rollout_adapter_served(spec: ModelDeploymentSpec, path: str) -> bool:
    """Whether the adapter ``spec.rollout.<path>`` names (if any) is in spec.adapters."""
    node: object = spec.rollout
    for part in path.split("."):
        node = getattr(node, part, None)
    adapter = getattr(node, "adapter", None)
    return adapter is None or adapter in {a.name for a in spec.adapters}


class GatedAdapter(TailorModel):
    name: str = Field(description="The adapter.")
    reason: str = Field(description="Its gate's state.")


class AdapterLoadError(TailorModel):
    name: str = Field(description="The adapter.")
    message: str = Field(description="Why the replica could not load it.")


class ReplicaAdapters(TailorModel):
    """The adapters one replica serves, as it reports them."""

    replica: str = Field(description="The pod (or local process).")
    adapters: list[str] = Field(default_factory=list, description="Adapters it serves now.")
    current: bool = Field(
        default=False, description="It serves the adapters of spec.adapters (adaptersRevision)."
    )
    errors: list[AdapterLoadError] = Field(
        default_factory=list, description="Adapters it could not load (the rest are served)."
    )
    message: str | None = Field(default=None, description="Why it could not be asked.")


class ModelDeploymentStatus(StatusBase):
    """Observed state of a ModelDeployment."""

    phase: Literal["Pending", "Progressing", "Ready", "Idle", "Degraded", "Failed"] | None = Field(
        default=None,
        description="Pending, Progressing, Ready, Idle (scaled to 0 replicas), Degraded or Failed.",
    )
    replicas: int | None = Field(default=None, description="Desired replicas.")
    ready_replicas: int | None = Field(default=None, description="Replicas ready to serve.")
    endpoint: str | None = Field(default=None, description="Base URL of the OpenAI-compatible API.")
    models: list[str] = Field(default_factory=list, description="Model names clients can request.")
    revision: str | None = Field(default=None, description="Hash of what is rolled out.")
    deployment_name: str | None = Field(default=None, description="The Deployment.")
    adapters_revision: str | None = Field(
        default=None,
        description="Digest of the adapters handed to the replicas. Adapters change without "
        "a rollout: each replica loads and unloads them in place.",
    )
    replica_adapters: list[ReplicaAdapters] = Field(
        default_factory=list, description="The adapters each ready replica serves."
    )
    rollout: RolloutStatus | None = Field(
        default=None, description="The rollout of spec.rollout: step, numbers, why."
    )
    gated_adapters: list[GatedAdapter] = Field(
        default_factory=list,
        description="Adapters served to Evaluations only: their FineTuneJob's evaluation "
        "gate has not passed (spec.adapters[].serveWithoutGate serves them to everyone).",
    )
