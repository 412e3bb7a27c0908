"""Splitting documents into chunks measured in the embedding model's own tokens.

Each document is tokenized once, with character offsets, by the embedding model's tokenizer;
chunk boundaries are then chosen in token space and the chunk keeps its token ids, so the
embedder never tokenizes the text a second time. ``recursive`` fills each chunk up to
``chunkTokens`` and cuts at the strongest boundary in its second half: a paragraph break,
else a line break, else a sentence end, else a space between words, else a hard cut; the
next chunk starts ``overlapTokens`` earlier, at the start of a word. ``markdown`` first
splits at headings (outside code fences) and starts every chunk of a section with its
heading path, so a chunk never loses the heading it belongs under. ``none`` makes one chunk
per document (the vector then covers the first tokens the model can read). Chunk sizes are
capped by what the model reads (e.g. 254 tokens for MiniLM's 256 with [CLS] and [SEP]).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tailor.api.knowledgebase import Chunking
from tailor.workloads.knowledge.documents import Document

log = logging.getLogger("tailor.workloads.knowledge.chunking")

HEADING = re.compile(r"^(#{1,6})[ \t]+\S")
FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
SENTENCE_END = ".!?;:"
TOKENIZE_GROUP = 64


@dataclass(frozen=True)
class Chunk:
    """A piece of a document and its tokens (without the model's special tokens)."""

    document: Document
    position: int
    text: str
    token_ids: list[int]


class Chunker:
    """Splits documents by a :class:`Chunking` spec, with the embedding model's tokenizer."""

    def __init__(self, tokenizer: Any, chunking: Chunking, max_tokens: int):
        self.tokenizer = tokenizer
        self.strategy = chunking.strategy
        self.max_tokens = max_tokens
        self.size = min(chunking.chunk_tokens, max_tokens)
        if chunking.chunk_tokens > max_tokens and self.strategy != "none":
            log.warning(
                "chunkTokens %d is more than the embedding model reads (%d tokens); using %d",
                chunking.chunk_tokens,
                max_tokens,
                self.size,
            )
        self.overlap = min(chunking.overlap_tokens, self.size // 2)
        self.truncated = 0
        """Documents longer than the model reads, with strategy none."""

    def chunks(self, documents: Iterable[Document]) -> Iterator[Chunk]:
        """The chunks of each document in turn, tokenizing documents in small batches."""
        group: list[Document] = []
        for document in documents:
            group.append(document)
            if len(group) == TOKENIZE_GROUP:
                yield from self._chunk_group(group)
                group = []
        if group:
            yield from self._chunk_group(group)

    def _chunk_group(self, documents: Sequence[Document]) -> Iterator[Chunk]:
        if self.strategy == "markdown":
            for document in documents:
                yield from self._markdown_chunks(document)
            return
        encoded = self._tokenize([d.text for d in documents])
        for document, (ids, offsets) in zip(documents, encoded, strict=True):
            if self.strategy == "none":
                if len(ids) > self.max_tokens:
                    self.truncated += 1
                yield Chunk(document, 0, document.text, ids[: self.max_tokens])
                continue
            spans = split_spans(document.text, offsets, self.size, self.overlap)
            for position, (start, end) in enumerate(spans):
                text = document.text[offsets[start][0] : offsets[end - 1][1]]
                yield Chunk(document, position, text, ids[start:end])

    def _markdown_chunks(self, document: Document) -> Iterator[Chunk]:
        sections = markdown_sections(document.text)
        encoded = self._tokenize([p for p, _ in sections] + [b for _, b in sections])
        position = 0
        for index, (path, body) in enumerate(sections):
            prefix, (prefix_ids, _) = path, encoded[index]
            if len(prefix_ids) > self.size // 2:  # keep only the section's own heading
                prefix = path.rsplit("\n", 1)[-1]
                prefix_ids = self._tokenize([prefix])[0][0]
                if len(prefix_ids) > self.size // 2:
                    prefix, prefix_ids = "", []
            ids, offsets = encoded[len(sections) + index]
            budget = self.size - len(prefix_ids)
            for start, end in split_spans(body, offsets, budget, min(self.overlap, budget // 2)):
                piece = body[offsets[start][0] : offsets[end - 1][1]]
                text = f"{prefix}\n\n{piece}" if prefix else piece
                yield Chunk(document, position, text, prefix_ids + ids[start:end])
                position += 1

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not texts:
            return []
        encoded = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        return list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))


def markdown_sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) of each markdown section that has a body, in order.

    The heading path holds the heading lines of the section and of its parents, one per
    line; text before the first heading has an empty path.
    """
    sections: list[tuple[str, str]] = []
    headings: list[tuple[int, str]] = []
    body: list[str] = []
    in_fence = False

    def flush() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append(("\n".join(line for _, line in headings), content))
        body.clear()

    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        flush()
        level = len(match.group(1))
        while headings and headings[-1][0] >= level:
            headings.pop()
        headings.append((level, line.strip()))
    flush()
    return sections


def split_spans(
    text: str, offsets: Sequence[tuple[int, int]], size: int, overlap: int
) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of at most ``size`` tokens covering all of ``offsets``.

    Each range ends at the strongest boundary (see :func:`_boundary`) in its second half,
    the largest such position winning ties; the next range starts ``overlap`` tokens
    before the end, moved forward to the start of a word.
    """
    count = len(offsets)
    if count == 0:
        return []
    size = max(size, 1)
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        limit = start + size
        if limit >= count:
            spans.append((start, count))
            return spans
        end, best = limit, 0
        for k in range(limit, start + max(size // 2, 1) - 1, -1):
            strength = _boundary(text, offsets, k)
            if strength > best:
                end, best = k, strength
                if strength == 4:
                    break
        spans.append((start, end))
        following = max(end - overlap, start + 1)
        while following < end and _boundary(text, offsets, following) == 0:
            following += 1
        start = following if following < end else max(end - overlap, start + 1)


def _boundary(text: str, offsets: Sequence[tuple[int, int]], k: int) -> int:
    """How good a cut between token ``k - 1`` and token ``k`` is, 0 (inside a word) to 4."""
    gap = text[offsets[k - 1][1] : offsets[k][0]]
    if not gap:
        return 0
    newlines = gap.count("\n")
    if newlines >= 2:
        return 4
    if newlines == 1:
        return 3
    if offsets[k - 1][1] > 0 and text[offsets[k - 1][1] - 1] in SENTENCE_END:
        return 2
    return 1
