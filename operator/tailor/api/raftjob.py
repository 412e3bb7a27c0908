"""RAFTJob: retrieval-augmented fine-tuning (Zhang et al. 2024).

Three stages: GeneratingData (questions with the gold document among distractors and
quoted chain-of-thought answers, from a KnowledgeBase), Training (a child FineTuneJob) and
Evaluating (RAG with the base model against the RAFT adapter on held-out questions).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel, cel_exactly_one, exactly_one
from tailor.api.common import (
    Artifact,
    DataSource,
    LocalObjectRef,
    Queueing,
    Resources,
    StatusBase,
    Teacher,
)
from tailor.api.finetunejob import FineTuneRecipe, RunOutput


class QuestionFields(TailorModel):
    """Field names in question records (json/jsonl)."""

    question: str = Field(default="question", description="Field holding the question.")
    answer: str | None = Field(default="answer", description="Field holding the gold answer.")
    document_id: str | None = Field(
        default="document_id", description="Field holding the gold document's id."
    )


class QuestionGeneration(TailorModel):
    """Generate questions from the knowledge base's chunks with a teacher model."""

    per_chunk: int = Field(default=2, ge=1, le=20, description="Questions per chunk.")
    teacher: Teacher = Field(description="The teacher model.")


class Questions(TailorModel):
    """The question set: given (source) or generated from chunks (generate)."""

    source: DataSource | None = Field(default=None, description="Question records.")
    fields: QuestionFields = Field(
        default_factory=QuestionFields, description="Field names in the records."
    )
    generate: QuestionGeneration | None = Field(default=None, description="Generate questions.")

    rules = (
        Rule(
            cel=cel_exactly_one("source", "generate"),
            message="set exactly one of source or generate",
            check=lambda m: exactly_one(m, "source", "generate"),
        ),
    )


class RaftRecipe(TailorModel):
    """The paper's data recipe."""

    oracle_probability: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Share P of examples whose context holds the gold document (paper: 0.8).",
    )
    distractors: int = Field(
        default=4, ge=0, le=32, description="Distractor documents per example (paper: 4)."
    )
    distractor_sampling: Literal["hard", "random"] = Field(
        default="hard", description="hard: nearest neighbours from the retriever; random."
    )
    chain_of_thought: bool = Field(
        default=True,
        description="Answers reason with verbatim ##begin_quote## ... ##end_quote## citations.",
    )
    seed: int = Field(default=42, ge=0, description="Seed for sampling and shuffling.")


class Evaluation(TailorModel):
    """How RAG and RAFT are compared on held-out questions."""

    holdout: float = Field(
        default=0.1, gt=0, lt=1, description="Share of questions held out for evaluation."
    )
    compare: list[Literal["rag", "raft"]] = Field(
        default_factory=lambda: list[Literal["rag", "raft"]](["rag", "raft"]),
        min_length=1,
        max_length=2,
        description="Systems to evaluate: rag (base model + retrieval), raft (adapter).",
    )
    protocol: Literal["oracle", "retriever"] = Field(
        default="oracle",
        description="oracle: gold document among distractors (the paper's); retriever: top-k.",
    )
    matcher: Literal["exact", "contains", "regex", "apibench"] = Field(
        default="contains",
        description="exact, contains, regex or apibench (Gorilla's AST evaluation, as the RAFT "
        "paper scores APIBench: a real API of the question's domain; exact and hallucination "
        "rate beside it). apibench needs a knowledge base of API cards whose "
        "format.json.metadataFields include domain (and api_call unless idField is api_call).",
    )
    max_questions: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many held-out questions."
    )
    max_tokens: int = Field(
        default=256, ge=16, le=4096, description="Longest answer generated per question."
    )


class RAFTJobSpec(Queueing):
    """A retrieval-augmented fine-tuning run."""

    knowledge_base_ref: LocalObjectRef = Field(description="The KnowledgeBase to train on.")
    questions: Questions = Field(description="Questions to build training examples from.")
    raft: RaftRecipe = Field(default_factory=RaftRecipe, description="The data recipe.")
    fine_tune: FineTuneRecipe = Field(description="How the child FineTuneJob trains.")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="The comparison.")
    resources: Resources = Field(
        default_factory=Resources, description="Compute for the data and evaluation Jobs."
    )
    output: RunOutput = Field(
        default_factory=RunOutput,
        description="The artifact store of the dataset, the child FineTuneJob's adapter "
        "and the evaluation (unset: the cluster's).",
    )

    rules = (
        Rule(
            cel="self.knowledgeBaseRef == oldSelf.knowledgeBaseRef",
            message="knowledgeBaseRef is immutable; create a new RAFTJob",
            field="knowledgeBaseRef",
            transition=True,
            check=lambda new, old: new.knowledge_base_ref == old.knowledge_base_ref,
        ),
    )


class DatasetStats(TailorModel):
    """What the data stage produced."""

    examples: int | None = Field(default=None, description="Training examples written.")
    with_oracle: float | None = Field(
        default=None, description="Share of examples whose context holds the gold document."
    )
    mean_context_tokens: float | None = Field(default=None, description="Mean context length.")
    holdout: int | None = Field(default=None, description="Questions held out.")
    artifact: Artifact | None = Field(default=None, description="The dataset files.")


class Score(TailorModel):
    """Accuracy of one system."""

    accuracy: float | None = Field(
        default=None,
        description="Share of correct answers, 0-1 (matcher apibench: the paper's metric).",
    )
    correct: int | None = Field(default=None, description="Correct answers.")
    total: int | None = Field(default=None, description="Questions asked.")
    exact: float | None = Field(
        default=None, description="matcher apibench: share of answers naming the gold API, 0-1."
    )
    hallucination: float | None = Field(
        default=None,
        description="matcher apibench: share of answers naming no API of the corpus, 0-1.",
    )


class EvaluationResults(TailorModel):
    """RAG against RAFT."""

    rag: Score | None = Field(default=None, description="Base model with retrieval.")
    raft: Score | None = Field(default=None, description="RAFT adapter with retrieval.")
    protocol: str | None = Field(default=None, description="oracle or retriever.")
    artifact: Artifact | None = Field(default=None, description="Per-question results.")


class RAFTJobStatus(StatusBase):
    """Observed state of a RAFTJob."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Pending, Running, Succeeded or Failed."
    )
    stage: Literal["GeneratingData", "Training", "Evaluating", "Succeeded", "Failed"] | None = (
        Field(default=None, description="GeneratingData, Training, Evaluating, Succeeded, Failed.")
    )
    dataset: DatasetStats | None = Field(default=None, description="The generated dataset.")
    fine_tune_job: str | None = Field(default=None, description="The child FineTuneJob.")
    evaluation: EvaluationResults | None = Field(default=None, description="The comparison.")
    artifact: Artifact | None = Field(default=None, description="The RAFT adapter.")
