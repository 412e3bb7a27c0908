"""The Tailor API (``tailor.dev/v1alpha1``): pydantic models of every resource.

This package is the single source of truth: the CRDs in ``crds/``, the Helm chart's CRDs,
the docs' field tables and the workloads' spec files are all generated from these models.
:data:`KINDS` lists the resources with their names, and :func:`parse` turns a
manifest into a typed resource or a list of field-naming error lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tailor.api.adaptationloop import AdaptationLoopSpec, AdaptationLoopStatus
from tailor.api.base import TailorModel, describe_errors, transition_errors
from tailor.api.common import StatusBase
from tailor.api.evaluation import EvaluationSpec, EvaluationStatus
from tailor.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus
from tailor.api.knowledgebase import KnowledgeBaseSpec, KnowledgeBaseStatus
from tailor.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from tailor.api.promptprofile import PromptProfileSpec, PromptProfileStatus
from tailor.api.raftjob import RAFTJobSpec, RAFTJobStatus

GROUP = "tailor.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "tailor"


@dataclass(frozen=True)
class PrinterColumn:
    """A `kubectl get` column."""

    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Kind:
    """Everything the generators and controllers need to know about one resource kind."""

    kind: str
    plural: str
    short_name: str
    spec: type[TailorModel]
    status: type[StatusBase]
    description: str
    columns: tuple[PrinterColumn, ...]

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")
PHASE = PrinterColumn("Phase", ".status.phase", description="Lifecycle phase.")

KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind(
            "PromptProfile",
            "promptprofiles",
            "pp",
            PromptProfileSpec,
            PromptProfileStatus,
            "A versioned prompt: system text, few-shot examples, a template and parameters.",
            (
                PHASE,
                PrinterColumn("Revision", ".status.revision", "integer"),
                PrinterColumn("Serving", ".status.served.revision", "integer"),
                PrinterColumn("Tests", ".status.tests.summary", description="PASS/TOTAL."),
                AGE,
            ),
        ),
        Kind(
            "KnowledgeBase",
            "knowledgebases",
            "kb",
            KnowledgeBaseSpec,
            KnowledgeBaseStatus,
            "Documents chunked, embedded and indexed in Qdrant for retrieval.",
            (
                PHASE,
                PrinterColumn("Documents", ".status.documents", "integer"),
                PrinterColumn("Chunks", ".status.chunks", "integer"),
                PrinterColumn("Collection", ".status.collection"),
                PrinterColumn("Last-Indexed", ".status.lastIndexed", "date", priority=1),
                AGE,
            ),
        ),
        Kind(
            "FineTuneJob",
            "finetunejobs",
            "ftj",
            FineTuneJobSpec,
            FineTuneJobStatus,
            "LoRA, QLoRA or full fine-tuning of a language model, run as a Job.",
            (
                PHASE,
                PrinterColumn("Method", ".spec.method"),
                PrinterColumn("Progress", ".status.progress.percent", "integer", "Percent done."),
                PrinterColumn("Loss", ".status.progress.loss", "number"),
                PrinterColumn("Eval-Loss", ".status.progress.evalLoss", "number", priority=1),
                PrinterColumn("ETA", ".status.progress.etaSeconds", "integer", priority=1),
                PrinterColumn("Base", ".spec.baseModel.builtin", priority=1),
                AGE,
            ),
        ),
        Kind(
            "RAFTJob",
            "raftjobs",
            "raft",
            RAFTJobSpec,
            RAFTJobStatus,
            "Retrieval-augmented fine-tuning: RAFT data from a KnowledgeBase, a child "
            "FineTuneJob, and an evaluation of RAG against RAFT.",
            (
                PHASE,
                PrinterColumn("Stage", ".status.stage"),
                PrinterColumn("KnowledgeBase", ".spec.knowledgeBaseRef.name"),
                PrinterColumn("RAG", ".status.evaluation.rag.accuracy", "number", priority=1),
                PrinterColumn("RAFT", ".status.evaluation.raft.accuracy", "number", priority=1),
                AGE,
            ),
        ),
        Kind(
            "ModelDeployment",
            "modeldeployments",
            "md",
            ModelDeploymentSpec,
            ModelDeploymentStatus,
            "An OpenAI-compatible server: base model, adapters, prompt profile, RAG.",
            (
                PHASE,
                PrinterColumn("Ready", ".status.readyReplicas", "integer"),
                PrinterColumn("Endpoint", ".status.endpoint"),
                PrinterColumn("Models", ".status.models", priority=1),
                PrinterColumn(
                    "Adapters",
                    '.status.conditions[?(@.type=="AdaptersLoaded")].reason',
                    priority=1,
                ),
                AGE,
            ),
        ),
        Kind(
            "Evaluation",
            "evaluations",
            "eval",
            EvaluationSpec,
            EvaluationStatus,
            "A one-shot measurement of candidates (deployment, adapter, retrieval) on a "
            "question set: metric with intervals, latency, cost, a paired test, a "
            "recommendation.",
            (
                PHASE,
                PrinterColumn("Questions", ".status.questions", "integer"),
                PrinterColumn(
                    "Recommended", ".status.recommendation.candidate", description="Candidate."
                ),
                PrinterColumn("Scoring", ".spec.scoring.type", priority=1),
                AGE,
            ),
        ),
        Kind(
            "AdaptationLoop",
            "adaptationloops",
            "loop",
            AdaptationLoopSpec,
            AdaptationLoopStatus,
            "Keeps a ModelDeployment's adapter improving from its use: triggered iterations "
            "train on feedback, gate against the champion, roll the winner out as a canary.",
            (
                PHASE,
                PrinterColumn("Deployment", ".spec.deploymentRef.name"),
                PrinterColumn("Champion", ".status.champion"),
                PrinterColumn("Promotion", ".spec.promotion", priority=1),
                AGE,
            ),
        ),
    )
}

KINDS_BY_PLURAL = {k.plural: k for k in KINDS.values()}

SpecT = TypeVar("SpecT", bound=TailorModel)
StatusT = TypeVar("StatusT", bound=StatusBase)


class ObjectMeta(BaseModel):
    """The parts of metadata Tailor reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(BaseModel, Generic[SpecT, StatusT]):
    """A whole object: apiVersion, kind, metadata, spec and status."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT | None = None


class ManifestError(ValueError):
    """A manifest Tailor cannot accept; ``lines`` name each bad field and the fix."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def kind_of(manifest: dict[str, Any]) -> Kind:
    """The :class:`Kind` of a manifest, or a ManifestError naming apiVersion/kind."""
    if manifest.get("apiVersion") != API_VERSION:
        raise ManifestError([f"apiVersion: must be {API_VERSION}"])
    kind = KINDS.get(str(manifest.get("kind")))
    if kind is None:
        raise ManifestError([f"kind: must be one of {', '.join(KINDS)}"])
    return kind


def parse_spec(kind: Kind, spec: Any) -> TailorModel:
    """The typed spec of a kind, or a ManifestError with one line per bad field."""
    if spec is None:
        raise ManifestError(["spec: Field required"])
    try:
        return kind.spec.model_validate(spec)
    except ValidationError as exc:
        raise ManifestError(describe_errors(exc, "spec")) from exc


def valid_spec(body: dict[str, Any]) -> TailorModel | None:
    """The typed spec of a stored object, or None when it does not parse (its kind's sync
    reports that): what the operator's checks before any pod read."""
    try:
        return parse_spec(KINDS[body["kind"]], body.get("spec"))
    except ManifestError:
        return None


def parse(manifest: dict[str, Any]) -> TailorModel:
    """Validate a manifest as the API server would (schema and rules); return its spec."""
    kind = kind_of(manifest)
    meta = manifest.get("metadata") or {}
    if not meta.get("name"):
        raise ManifestError(["metadata.name: Field required"])
    return parse_spec(kind, manifest.get("spec"))


def parse_update(old: dict[str, Any], new: dict[str, Any]) -> TailorModel:
    """Validate an update of ``old`` to ``new``, including immutable fields."""
    old_spec = parse(old)
    new_spec = parse(new)
    errors = transition_errors(old_spec, new_spec)
    if errors:
        raise ManifestError(errors)
    return new_spec


__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "KINDS",
    "KINDS_BY_PLURAL",
    "VERSION",
    "Kind",
    "ManifestError",
    "ObjectMeta",
    "PrinterColumn",
    "Resource",
    "kind_of",
    "parse",
    "parse_spec",
    "parse_update",
]
