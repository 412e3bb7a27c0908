"""Learning from labelled questions: a KnowledgeBase's ``spec.adaptation``.

Users label the questions their knowledge base has seen with the document that answers each
one. Before indexing, the index workload fine-tunes the embedding model on those pairs
(contrastive, sentence-transformers' MultipleNegativesRankingLoss: the other documents of a
batch are the negatives), holding out a seeded share of the pairs; it scores hit@1, hit@5
and MRR on the held-out questions, per document over the whole knowledge base, with the base
model and with the tuned one, and indexes with the tuned model only when it ranks the held-out
documents better. The scores go to ``status.adaptation``.

The tuned model is saved under ``RetrieverConfig.embedders`` in a folder named by a hash of
everything it was trained from (base model, pairs, the texts of their documents, settings),
with ``adaptation.json`` beside it; each index version records the folder its vectors come
from (``tailorEmbedder``), and readers embed queries with that model. A refresh whose pairs
and labelled documents did not change reuses the folder: no training, and unchanged chunks
keep their vectors.

Measured on APIBench (``tests/bench/bench_retrieval.py``): the 837 Torch Hub training
questions raise Torch Hub hit@5 and, with no HuggingFace question seen, HuggingFace's too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.losses import MultipleNegativesRankingLoss
from transformers import get_linear_schedule_with_warmup

from tailor.api.knowledgebase import Adaptation, AdaptationStatus, RetrievalScores
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.records import read_raw
from tailor.workloads.knowledge.chunking import Chunk
from tailor.workloads.knowledge.retriever import Embedder, load_embedder_folder

log = logging.getLogger("tailor.workloads.knowledge.adaptation")

MIN_PAIRS = 10
"""Fewer labelled pairs than this cannot be split into a training and a held-out share."""
RANKED = 50
"""Documents ranked per held-out question (MRR counts 0 beyond)."""
STATUS_FILE = "adaptation.json"
NEGATIVES_FIELD = "negatives"
"""Optional field of a pair: ids of documents that do not answer its question (hard
negatives; a feedback source's retrieval format writes the cited documents users marked
not useful)."""
CORRECTION_FIELD = "correction"
"""Field of a pair with no document: the answer a user wanted (a feedback source's retrieval
format writes it when no cited document was useful); the pair is labelled with the document
whose id the correction names (:func:`named_document`)."""


Example = tuple[str, str, str | None]
"""(question, positive text, hard negative text or None): what the model is tuned on."""


@dataclass(frozen=True)
class Pair:
    """A labelled question: the id of the document that answers it, where it was read."""

    question: str
    document: str
    where: str
    negatives: tuple[str, ...] = ()
    """Documents marked as not answering it (hard negatives), e.g. from feedback."""
    correction: str = ""
    """With no document: the answer the user wanted, which names the document by its id."""


def read_pairs(adaptation: Adaptation, paths: Paths) -> list[Pair]:
    """Every labelled pair of ``spec.adaptation.questions``; a bad record fails naming it."""
    pairs = []
    qf, df = adaptation.question_field, adaptation.document_field
    for where, record in read_raw(adaptation.questions, paths):
        if not isinstance(record, dict):
            raise WorkloadError(
                "InvalidAdaptation",
                f"spec.adaptation.questions: {where}: expected a JSON object with "
                f"{qf!r} and {df!r}, got {type(record).__name__}",
            )
        question, document = record.get(qf), record.get(df)
        correction = record.get(CORRECTION_FIELD) if document is None else None
        if isinstance(correction, str) and correction.strip():
            document = ""  # labelled by the document the correction names, once indexed
        if not isinstance(question, str) or not question.strip():
            raise WorkloadError(
                "InvalidAdaptation",
                f"spec.adaptation.questions: {where}: no question in field {qf!r} (the record "
                f"has {sorted(record)[:10]}); set spec.adaptation.questionField",
            )
        if not isinstance(document, str | int) or (str(document) == "" and not correction):
            raise WorkloadError(
                "InvalidAdaptation",
                f"spec.adaptation.questions: {where}: no document id in field {df!r} and no "
                f"{CORRECTION_FIELD!r} naming one (the record has {sorted(record)[:10]}); "
                "set spec.adaptation.documentField",
            )
        negatives = record.get(NEGATIVES_FIELD) or []
        if isinstance(negatives, str | int):
            negatives = [negatives]
        if not isinstance(negatives, list) or not all(isinstance(n, str | int) for n in negatives):
            raise WorkloadError(
                "InvalidAdaptation",
                f"spec.adaptation.questions: {where}: {NEGATIVES_FIELD!r} must be a list of "
                "document ids (documents that do not answer the question)",
            )
        others = tuple(str(n) for n in negatives if str(n) != str(document))
        pairs.append(Pair(question.strip(), str(document), where, others, correction or ""))
    return pairs


def _labelled(pair: Pair, ids: Sequence[str]) -> Pair:
    """A pair labelled by its correction gets the document the correction names (or none)."""
    if not pair.correction:
        return pair
    document = named_document(pair.correction, ids) or ""
    negatives = tuple(n for n in pair.negatives if n != document)
    return dataclasses.replace(pair, document=document, negatives=negatives)


def _named(pair: Pair) -> str:
    """What an unmatched pair named, for messages."""
    return repr(pair.document) if pair.document else "a correction naming no indexed document"


MIN_NAMED_ID = 4
"""Shorter document ids are not looked for in corrections (an id "7" is in too many texts)."""


def named_document(correction: str, ids: Sequence[str]) -> str | None:
    """The document a correction names: the longest id written in it (an id that is part of
    a longer named id, e.g. ``resnet50`` in ``resnet50_2``, loses), or None. Not a guess by
    similarity: a pair labelled by the embedder it tunes would teach it its own mistakes."""
    named = [d for d in ids if len(d) >= MIN_NAMED_ID and d in correction]
    return max(named, key=len) if named else None


def split(pairs: Sequence[Pair], holdout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs: a seeded shuffle, at least one pair on each side."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    held = min(len(order) - 1, max(1, round(len(order) * holdout)))
    return order[held:], order[:held]


def rank_scores(
    queries: np.ndarray, chunks: np.ndarray, chunk_documents: Sequence[str], gold: Sequence[str]
) -> RetrievalScores:
    """hit@1, hit@5 and MRR of the gold documents: each document ranked by its best chunk."""
    documents = sorted(set(chunk_documents))
    column = {d: i for i, d in enumerate(documents)}
    owner = np.array([column[d] for d in chunk_documents])
    hit1 = hit5 = 0
    reciprocal = 0.0
    for start in range(0, len(queries), 256):  # bounded memory at 100k chunks
        similarity = queries[start : start + 256] @ chunks.T
        best = np.full((len(similarity), len(documents)), -np.inf, dtype=np.float32)
        for i in range(len(similarity)):
            np.maximum.at(best[i], owner, similarity[i])
        for scores, answer in zip(best, gold[start : start + 256], strict=True):
            rank = 1 + int(np.sum(scores > scores[column[answer]]))
            hit1 += rank == 1
            hit5 += rank <= 5
            reciprocal += 1 / rank if rank <= RANKED else 0.0
    n = max(1, len(gold))
    return RetrievalScores(
        hit_at_1=round(hit1 / n, 4), hit_at_5=round(hit5 / n, 4), mrr=round(reciprocal / n, 4)
    )


def no_duplicate_batches(
    pairs: Sequence[Example], batch_size: int, rng: random.Random
) -> list[list[Example]]:
    """Shuffled batches in which no question and no document text appears twice: an equal
    text elsewhere in the batch would be scored as a negative of its own pair (the idea of
    sentence-transformers' NoDuplicatesBatchSampler)."""
    pending = list(pairs)
    rng.shuffle(pending)
    batches = []
    while pending:
        batch: list[Example] = []
        texts: set[str] = set()
        rest = []
        for pair in pending:
            own = {t for t in pair if t is not None}
            if len(batch) < batch_size and not texts & own:
                batch.append(pair)
                texts.update(own)
            else:
                rest.append(pair)
        batches.append(batch)
        pending = rest
    return [b for b in batches if len(b) > 1]  # a lone pair has no negative


def fine_tune(
    model: SentenceTransformer,
    pairs: Sequence[Example],
    adaptation: Adaptation,
    progress: Callable[[int, int], None] | None = None,
    pool: Sequence[str] = (),
) -> float:
    """Train ``model`` in place on (question, document text, hard negative text or None)
    examples; returns the last loss. A batch with a hard negative gives MNRL a third column
    (every anchor is scored against every positive and every negative); the examples of
    that batch without one get a text of ``pool`` that is not in the batch."""
    torch.manual_seed(adaptation.seed)
    rng = random.Random(adaptation.seed)
    epochs = [
        no_duplicate_batches(pairs, adaptation.batch_size, rng) for _ in range(adaptation.epochs)
    ]
    total = sum(len(e) for e in epochs)
    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=adaptation.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total // 10), max(1, total))
    model.train()
    step, last = 0, float("nan")
    try:
        for batches in epochs:
            for batch in batches:
                columns = [[pair[0] for pair in batch], [pair[1] for pair in batch]]
                if any(pair[2] for pair in batch) and pool:
                    taken = {t for pair in batch for t in pair if t}
                    spare = [
                        t for t in rng.sample(list(pool), min(len(pool), 64)) if t not in taken
                    ]
                    columns.append([pair[2] or spare.pop() for pair in batch])
                features = [_to(model.preprocess(c), model.device) for c in columns]
                loss = loss_fn(features, torch.empty(0))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                step, last = step + 1, loss.item()
                if progress:
                    progress(step, total)
    finally:
        model.eval()
    return last


def _to(features: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}


@dataclass
class Adapted:
    """What indexing uses after adaptation."""

    embedder: Embedder
    """The model to index with: the tuned one when kept, else the base."""
    folder: str | None
    """The tuned model's folder under ``embedders`` when it is the one indexing."""
    status: AdaptationStatus
    vectors: dict[str, np.ndarray]
    """Vectors already computed with ``embedder``, by chunk text (empty when reused)."""


def adapt(
    adaptation: Adaptation,
    base: Embedder,
    chunks: Sequence[Chunk],
    paths: Paths,
    embedders: Path,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Adapted:
    """Fine-tune ``base`` on the labelled pairs (or reuse an earlier run); see the module."""
    started = time.monotonic()
    documents: dict[str, list[int]] = {}
    for i, chunk in enumerate(chunks):
        documents.setdefault(chunk.document.id, []).append(i)
    pairs = [_labelled(p, list(documents)) for p in read_pairs(adaptation, paths)]
    matched = [p for p in pairs if p.document in documents]
    unmatched = [p for p in pairs if p.document not in documents]
    if len(matched) < MIN_PAIRS:
        example = f" (e.g. {_named(unmatched[0])} at {unmatched[0].where})" if unmatched else ""
        raise WorkloadError(
            "InvalidAdaptation",
            f"spec.adaptation.questions: {len(matched)} of {len(pairs)} pairs name a document "
            f"of this knowledge base{example}; at least {MIN_PAIRS} are needed. A document "
            "is named by format.json.idField's value, or by a file's label for file sources",
        )
    if unmatched:
        log.warning(
            "adaptation: %d pairs name documents that are not indexed (e.g. %s at %s); skipped",
            len(unmatched),
            _named(unmatched[0]),
            unmatched[0].where,
        )
    key = _key(adaptation, base, matched, chunks, documents)
    folder = embedders / f"{_safe(base.key)}-{key}"
    if (folder / STATUS_FILE).is_file():
        status = AdaptationStatus.model_validate_json((folder / STATUS_FILE).read_text())
        log.info("adaptation: reusing %s (kept: %s)", folder.name, status.kept)
        if status.kept:
            return Adapted(load_embedder_folder(folder), folder.name, status, {})
        return Adapted(base, None, status, {})

    train, held = split(matched, adaptation.holdout, adaptation.seed)
    log.info(
        "adaptation: %d pairs, %d to train on, %d held out", len(matched), len(train), len(held)
    )
    owners = [chunk.document.id for chunk in chunks]
    base_vectors = _embed_chunks(base, chunks, batch_size)
    questions = base.embed_queries([p.question for p in matched])
    # The positive of each pair: its document's chunk nearest to the question (base model).
    position = {p: i for i, p in enumerate(matched)}
    examples: list[Example] = []
    for pair in train:
        vector = questions[position[pair]]

        def nearest(document: str, vector: np.ndarray = vector) -> str:
            """The document's chunk nearest to the question (base model)."""
            best = max(documents[document], key=lambda c: float(base_vectors[c] @ vector))
            return chunks[best].text

        negative = next((nearest(d) for d in pair.negatives if d in documents), None)
        examples.append((pair.question, nearest(pair.document), negative))
    held_gold = [p.document for p in held]
    before = rank_scores(questions[[position[p] for p in held]], base_vectors, owners, held_gold)

    model = copy.deepcopy(base.model)  # the base stays as loaded (it is shared in-process)
    pool = [chunk.text for chunk in chunks]
    loss = fine_tune(model, examples, adaptation, progress, pool)
    tuned = Embedder(model, f"{base.key}+adapted-{key}", base.location)
    tuned_vectors = _embed_chunks(tuned, chunks, batch_size)
    held_questions = tuned.embed_queries([p.question for p in held])
    after = rank_scores(held_questions, tuned_vectors, owners, held_gold)
    kept = (after.hit_at_5, after.mrr) > (before.hit_at_5, before.mrr)
    status = AdaptationStatus(
        pairs=len(matched),
        unmatched=len(unmatched),
        trained=len(train),
        held_out=len(held),
        before=before,
        after=after,
        kept=kept,
        model=tuned.key if kept else base.key,
        seconds=round(time.monotonic() - started, 1),
    )
    log.info(
        "adaptation: held-out hit@5 %.3f -> %.3f, MRR %.3f -> %.3f (last loss %.3f): %s",
        before.hit_at_5,
        after.hit_at_5,
        before.mrr,
        after.mrr,
        loss,
        "indexing with the tuned model" if kept else "keeping the base model",
    )
    _save(folder, model if kept else None, status)
    if not kept:
        return Adapted(base, None, status, _by_text(chunks, base_vectors))
    tuned = load_embedder_folder(folder)  # the saved copy readers load too
    return Adapted(tuned, folder.name, status, _by_text(chunks, tuned_vectors))


def _embed_chunks(embedder: Embedder, chunks: Sequence[Chunk], batch_size: int) -> np.ndarray:
    """Vectors of every chunk, embedded from its token ids, longest first (less padding)."""
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].token_ids))
    out = np.zeros((len(chunks), embedder.dimension), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        out[batch] = embedder.embed_token_ids([chunks[i].token_ids for i in batch])
    return out


def _by_text(chunks: Sequence[Chunk], vectors: np.ndarray) -> dict[str, np.ndarray]:
    return {chunk.text: vectors[i] for i, chunk in enumerate(chunks)}


def _key(
    adaptation: Adaptation,
    base: Embedder,
    pairs: Sequence[Pair],
    chunks: Sequence[Chunk],
    documents: dict[str, list[int]],
) -> str:
    """Hash of what training depends on: documents that no pair names may change freely."""
    digest = hashlib.sha256()
    settings = adaptation.model_dump(mode="json", exclude={"questions"})
    digest.update(json.dumps([base.key, settings], sort_keys=True).encode())
    for pair in pairs:
        digest.update(f"\0{pair.question}\0{pair.document}\0{pair.negatives}".encode())
    for document in sorted({p.document for p in pairs}):
        for i in documents[document]:
            digest.update(f"\0{document}\0{chunks[i].text}".encode())
    return digest.hexdigest()[:16]


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in key.split("/")[0])[:80]


def _save(folder: Path, model: SentenceTransformer | None, status: AdaptationStatus) -> None:
    """Write the folder whole or not at all (readers and later builds trust what exists)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if model is not None:
            model.save(str(staging))
        (staging / STATUS_FILE).write_text(status.model_dump_json(by_alias=True, indent=1))
        for path in [staging, *staging.rglob("*")]:  # readers may run as another user
            path.chmod(0o755 if path.is_dir() else 0o644)
        if folder.exists():  # an equal run finished first: keep it
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prune(embedders: Path, keep: set[str]) -> list[str]:
    """Delete tuned models no kept version uses (and leftovers of interrupted saves);
    folders of runs that kept the base model stay, so a refresh does not train again."""
    removed: list[str] = []
    if not embedders.is_dir():
        return removed
    for folder in embedders.iterdir():
        if folder.name in keep:
            continue
        status = folder / STATUS_FILE
        unused_model = status.is_file() and (folder / "config.json").is_file()
        if folder.name.startswith(".") or unused_model:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
