"""Chunking (tailor.workloads.knowledge.chunking) with the builtin MiniLM's real tokenizer.

Only the tokenizer is loaded (no model weights), so these run in about a second.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from transformers import AutoTokenizer

from tailor.api.knowledgebase import Chunking
from tailor.workloads.io.sources import builtin_path
from tailor.workloads.knowledge.chunking import Chunk, Chunker, markdown_sections, split_spans
from tailor.workloads.knowledge.documents import Document

MODEL_READS = 254  # MiniLM reads 256 tokens, two of them [CLS] and [SEP]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(builtin_path("minilm-l6-v2")))


def chunk(tokenizer: Any, text: str, **chunking: Any) -> list[Chunk]:
    chunker = Chunker(tokenizer, Chunking(**chunking), MODEL_READS)
    return list(chunker.chunks([Document("doc", text, "test")]))


def paragraphs(count: int, sentences: int) -> str:
    return "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s} has words." for s in range(sentences))
        for p in range(count)
    )


def test_recursive_chunks_respect_size_and_cover_the_text(tokenizer: Any) -> None:
    text = paragraphs(8, 9)
    chunks = chunk(tokenizer, text, chunk_tokens=64, overlap_tokens=8)
    assert len(chunks) > 5
    assert all(len(c.token_ids) <= 64 for c in chunks)
    assert [c.position for c in chunks] == list(range(len(chunks)))
    # together the chunks hold every word of the document, in order
    words = [w for c in chunks for w in c.text.split()]
    assert set(words) == set(text.split())
    assert chunks[0].text.startswith("Paragraph 0") and chunks[-1].text.endswith("has words.")


def test_chunks_end_at_the_strongest_boundary(tokenizer: Any) -> None:
    # each paragraph is about 55 tokens: a 64-token chunk must end at a paragraph break
    chunks = chunk(tokenizer, paragraphs(4, 7), chunk_tokens=64, overlap_tokens=0)
    assert [c.text.count("\n\n") for c in chunks] == [0] * len(chunks)
    assert all(c.text.endswith("has words.") for c in chunks)
    # without paragraphs, a cut comes after a sentence, never inside a word
    chunks = chunk(tokenizer, paragraphs(1, 40), chunk_tokens=50, overlap_tokens=0)
    assert all(c.text.endswith(".") for c in chunks[:-1])


def test_overlap_repeats_the_end_of_the_previous_chunk(tokenizer: Any) -> None:
    chunks = chunk(tokenizer, paragraphs(1, 40), chunk_tokens=60, overlap_tokens=12)
    for before, after in itertools.pairwise(chunks):
        shared = after.token_ids[:6]
        tail = before.token_ids[-16:]
        assert any(tail[i : i + 6] == shared for i in range(len(tail) - 5)), (
            before.text,
            after.text,
        )
        assert after.text.split()[0] in before.text.split()  # starts at a whole word


def test_token_ids_are_the_tokenization_of_the_chunk_text(tokenizer: Any) -> None:
    # the embedder uses these ids directly, so they must be what tokenizing the text gives
    for c in chunk(tokenizer, paragraphs(5, 8), chunk_tokens=48, overlap_tokens=8):
        assert tokenizer(c.text, add_special_tokens=False)["input_ids"] == c.token_ids


def test_chunk_size_is_capped_by_what_the_model_reads(tokenizer: Any) -> None:
    chunks = chunk(tokenizer, paragraphs(30, 10), chunk_tokens=1024, overlap_tokens=48)
    assert max(len(c.token_ids) for c in chunks) <= MODEL_READS
    assert min(len(c.token_ids) for c in chunks[:-1]) > MODEL_READS // 2  # cut in 2nd half


def test_markdown_keeps_headings_with_their_sections(tokenizer: Any) -> None:
    text = (
        "# Guide\nIntro text.\n\n## Install\n"
        + "Install step one is here. " * 30
        + "\n\n```bash\n# a comment, not a heading\npip install x\n```\n\n### Linux\nUse apt.\n\n"
        "## Usage\nRun it.\n"
    )
    sections = markdown_sections(text)
    assert [path for path, _ in sections] == [
        "# Guide",
        "# Guide\n## Install",
        "# Guide\n## Install\n### Linux",
        "# Guide\n## Usage",
    ]
    chunks = chunk(tokenizer, text, strategy="markdown", chunk_tokens=64, overlap_tokens=8)
    install = [c for c in chunks if c.text.startswith("# Guide\n## Install\n\n")]
    assert len(install) >= 3  # the long section is split, each piece under its heading
    assert all(len(c.token_ids) <= 64 for c in chunks)
    assert any("# a comment, not a heading" in c.text for c in install)
    assert chunks[-1].text == "# Guide\n## Usage\n\nRun it."
    assert tokenizer(chunks[-1].text, add_special_tokens=False)["input_ids"] == chunks[-1].token_ids


def test_none_makes_one_chunk_per_document(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, Chunking(strategy="none"), MODEL_READS)
    long_text = paragraphs(10, 10)
    docs = [Document("a", "short one", "s"), Document("b", long_text, "s")]
    chunks = list(chunker.chunks(docs))
    assert [(c.document.id, c.position) for c in chunks] == [("a", 0), ("b", 0)]
    assert chunks[1].text == long_text  # the payload keeps the whole document
    assert len(chunks[1].token_ids) == MODEL_READS  # the vector covers what the model reads
    assert chunker.truncated == 1


def test_split_spans_makes_progress_on_text_without_boundaries() -> None:
    offsets = [(i, i + 1) for i in range(100)]  # one 100-character "word"
    spans = split_spans("x" * 100, offsets, size=30, overlap=10)
    assert spans[0] == (0, 30) and spans[-1][1] == 100
    assert all(b[0] > a[0] for a, b in itertools.pairwise(spans))
