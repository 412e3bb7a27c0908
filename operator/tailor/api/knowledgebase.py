"""KnowledgeBase: documents chunked, embedded and indexed in Qdrant for retrieval (RAG).

Each full build writes a new versioned collection and moves an alias to it only when the
build is complete, so readers never see a half-built index.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tailor.api.base import Rule, TailorModel
from tailor.api.common import (
    DataSource,
    EmbeddingModelSource,
    Resources,
    SecretKeyRef,
    StatusBase,
)


class JsonFormat(TailorModel):
    """How to read json and jsonl records as documents."""

    text_fields: list[str] = Field(
        default_factory=lambda: ["text"],
        min_length=1,
        max_length=32,
        description=(
            "Record fields whose values form the document text, in order; with more than "
            "one, each becomes a 'field: value' line."
        ),
    )
    id_field: str | None = Field(
        default=None, max_length=256, description="Field holding a stable document id."
    )
    title_field: str | None = Field(default=None, max_length=256, description="Title field.")
    metadata_fields: list[str] = Field(
        default_factory=list, max_length=32, description="Fields copied into chunk metadata."
    )


class DocumentFormat(TailorModel):
    """How source files are read. txt, md, html and pdf need no settings."""

    json_: JsonFormat | None = Field(
        default=None, alias="json", description="Reading json arrays and jsonl records."
    )


class Chunking(TailorModel):
    """How documents are split into chunks, measured in the embedding model's tokens."""

    strategy: Literal["recursive", "markdown", "none"] = Field(
        default="recursive",
        description=(
            "recursive: split on paragraphs, lines, sentences, words; markdown: keep "
            "headings with their sections; none: one chunk per document."
        ),
    )
    chunk_tokens: int = Field(default=384, ge=16, le=8192, description="Largest chunk, in tokens.")
    overlap_tokens: int = Field(
        default=48, ge=0, le=4096, description="Tokens repeated between neighbouring chunks."
    )

    rules = (
        Rule(
            cel="self.overlapTokens < self.chunkTokens",
            message="overlapTokens must be smaller than chunkTokens",
            field="overlapTokens",
            check=lambda m: m.overlap_tokens < m.chunk_tokens,
        ),
    )


class Embedding(TailorModel):
    """The embedding model."""

    model: EmbeddingModelSource = Field(
        default_factory=lambda: EmbeddingModelSource(builtin="minilm-l6-v2"),
        description="Embedding model; default the builtin minilm-l6-v2.",
    )
    batch_size: int = Field(default=64, ge=1, le=4096, description="Chunks embedded per batch.")


class QdrantStore(TailorModel):
    """A Qdrant vector store. Without url, Qdrant Edge (in-process) on the artifacts volume."""

    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="Qdrant server URL, e.g. http://qdrant:6333; omit for Qdrant Edge in-process.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the Qdrant API key."
    )
    collection: str | None = Field(
        default=None,
        max_length=200,
        pattern=r"^[A-Za-z0-9_-]+$",
        description=(
            "Name of the alias that clients query, inside the namespace: the alias is "
            "<namespace>_<collection> and its versioned collections <alias>-v<N>. "
            "Default: the KnowledgeBase's name."
        ),
    )
    shards: int = Field(default=1, ge=1, le=64, description="Shards of each collection.")
    replicas: int = Field(default=1, ge=1, le=8, description="Replicas of each shard.")
    quantization: Literal["none", "scalar", "binary"] = Field(
        default="none", description="Vector quantization: none, scalar (int8) or binary."
    )
    keep_collections: int = Field(
        default=1,
        ge=0,
        le=10,
        description="Previous collections kept for rollback after the alias moves.",
    )

    rules = (
        Rule(
            cel="!has(self.apiKeySecretRef) || has(self.url)",
            message="apiKeySecretRef needs url: embedded Qdrant has no API key",
            field="apiKeySecretRef",
            check=lambda m: m.api_key_secret_ref is None or m.url is not None,
        ),
    )


class Store(TailorModel):
    """Where vectors are stored."""

    qdrant: QdrantStore = Field(default_factory=QdrantStore, description="Qdrant settings.")


Bm25Language = Literal[
    "arabic",
    "chinese",
    "danish",
    "dutch",
    "english",
    "finnish",
    "french",
    "german",
    "greek",
    "hungarian",
    "italian",
    "japanese",
    "norwegian",
    "portuguese",
    "romanian",
    "russian",
    "spanish",
    "swedish",
    "turkish",
]
"""The languages Qdrant's BM25 has stop words and a stemmer (or a tokenizer) for."""


class Retrieval(TailorModel):
    """Default retrieval settings for consumers (serving, RAFT)."""

    top_k: int = Field(default=4, ge=1, le=100, description="Chunks returned per query.")
    score_threshold: float | None = Field(
        default=None, ge=-1, le=1, description="Lowest cosine similarity returned."
    )
    hybrid: bool = Field(
        default=False, description="Fuse dense vectors with BM25 sparse vectors (RRF)."
    )
    language: Bm25Language = Field(
        default="english",
        description=(
            "Language of the documents, for BM25's stop words and stemmer (Qdrant's BM25)."
        ),
    )


class Adaptation(TailorModel):
    """Learning from labelled questions: the embedding model fine-tuned on the questions a
    knowledge base has seen, paired with the document that answers each one."""

    questions: DataSource = Field(
        description=(
            "JSON lines or a JSON array of {question, document} records: a question and the "
            "id of the document that answers it (format.json.idField's value, or a file's "
            "label for file sources), optionally negatives: ids of documents that do not "
            "(hard negatives), or instead of document a correction: a text that writes the "
            "id of the document that answers (the longest id written in it labels the "
            "question); or a feedback source with format: retrieval."
        )
    )
    question_field: str = Field(
        default="question", min_length=1, max_length=256, description="Field with the question."
    )
    document_field: str = Field(
        default="document",
        min_length=1,
        max_length=256,
        description="Field with the id of the document that answers the question.",
    )
    holdout: float = Field(
        default=0.2,
        ge=0.05,
        le=0.5,
        description=(
            "Share of the pairs held out (seeded) to measure hit@1, hit@5 and MRR before and "
            "after; the tuned model is used only when it ranks the held-out documents better."
        ),
    )
    epochs: int = Field(default=3, ge=1, le=20, description="Passes over the training pairs.")
    learning_rate: float = Field(default=2e-5, gt=0, le=1e-3, description="Peak learning rate.")
    batch_size: int = Field(
        default=32,
        ge=2,
        le=512,
        description="Pairs per step; the other documents of a batch are the negatives.",
    )
    seed: int = Field(default=42, description="Seed of the split and of training.")


class RetrievalScores(TailorModel):
    """Retrieval quality on held-out questions, per document."""

    hit_at_1: float = Field(description="Share of questions whose document ranks first.")
    hit_at_5: float = Field(description="Share of questions whose document is in the top 5.")
    mrr: float = Field(
        description="Mean reciprocal rank of the document (0 when not in the top 50)."
    )


class AdaptationStatus(TailorModel):
    """What spec.adaptation did in the build now serving."""

    pairs: int = Field(description="Pairs whose document is in the knowledge base.")
    unmatched: int = Field(
        default=0, description="Pairs skipped because their document is not in the knowledge base."
    )
    trained: int = Field(description="Pairs trained on.")
    held_out: int = Field(description="Pairs held out for the scores.")
    before: RetrievalScores = Field(description="Held-out scores of the base embedding model.")
    after: RetrievalScores = Field(description="Held-out scores of the tuned model.")
    kept: bool = Field(description="Whether the tuned model is the one serving.")
    model: str = Field(description="The embedding model serving: the base, or the tuned one.")
    seconds: float | None = Field(default=None, description="Training and scoring time.")


class Refresh(TailorModel):
    """Periodic re-indexing. Refreshes are incremental: unchanged chunks are not re-embedded."""

    schedule: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^(@(hourly|daily|weekly|monthly)|(\S+\s+){4}\S+)$",
        description="Cron schedule (5 fields or @hourly/@daily/@weekly/@monthly).",
    )


class KnowledgeBaseSpec(TailorModel):
    """Documents to index for retrieval."""

    sources: list[DataSource] = Field(
        min_length=1, max_length=64, description="Where the documents come from."
    )
    format: DocumentFormat = Field(
        default_factory=DocumentFormat, description="How source files are read."
    )
    chunking: Chunking = Field(default_factory=Chunking, description="How documents are split.")
    embedding: Embedding = Field(default_factory=Embedding, description="The embedding model.")
    store: Store = Field(default_factory=Store, description="The vector store.")
    retrieval: Retrieval = Field(default_factory=Retrieval, description="Retrieval defaults.")
    refresh: Refresh | None = Field(default=None, description="Re-index on a schedule.")
    adaptation: Adaptation | None = Field(
        default=None,
        description=(
            "Fine-tune the embedding model on labelled questions before indexing (kept only "
            "when held-out retrieval improves)."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources, description="Compute for the index Job."
    )

    rules = (
        Rule(
            cel="self.sources.all(s, !has(s.feedback))",
            message="a feedback source gives records, not documents: use it in "
            "spec.adaptation.questions (format: retrieval), or name the documents' files",
            field="sources",
            check=lambda m: all(s.feedback is None for s in m.sources),
        ),
        Rule(
            cel="!has(self.adaptation) || !has(self.adaptation.questions.feedback) || "
            "self.adaptation.questions.feedback.format == 'retrieval'",
            message="spec.adaptation.questions from feedback needs format: retrieval "
            "({question, document} pairs)",
            field="adaptation.questions.feedback.format",
            check=lambda m: (
                m.adaptation is None
                or m.adaptation.questions.feedback is None
                or m.adaptation.questions.feedback.format == "retrieval"
            ),
        ),
    )


class KnowledgeBaseStatus(StatusBase):
    """Observed state of a KnowledgeBase."""

    phase: Literal["Pending", "Indexing", "Ready", "Failed"] | None = Field(
        default=None, description="Pending, Indexing, Ready or Failed."
    )
    documents: int | None = Field(default=None, description="Documents indexed.")
    chunks: int | None = Field(default=None, description="Chunks indexed.")
    vectors: int | None = Field(default=None, description="Vectors in the active collection.")
    embedded: int | None = Field(
        default=None, description="Chunks embedded by the last run (0 when nothing changed)."
    )
    collection: str | None = Field(default=None, description="The active versioned collection.")
    alias: str | None = Field(default=None, description="The alias clients query.")
    last_indexed: str | None = Field(default=None, description="When the last build finished.")
    index_seconds: float | None = Field(default=None, description="Duration of the last build.")
    content_hash: str | None = Field(default=None, description="sha256 over all chunk hashes.")
    job_name: str | None = Field(default=None, description="The current or last index Job.")
    build: int | None = Field(default=None, description="Number of the current or last build.")
    ready_build: int | None = Field(default=None, description="The build now serving queries.")
    build_generation: int | None = Field(
        default=None, description="The .metadata.generation the current build indexes."
    )
    next_refresh: str | None = Field(default=None, description="When the next refresh is due.")
    adaptation: AdaptationStatus | None = Field(
        default=None, description="Held-out scores of spec.adaptation, before and after."
    )
