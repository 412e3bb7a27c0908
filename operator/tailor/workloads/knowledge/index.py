"""The index workload: ``python -m tailor.workloads.knowledge.index --spec FILE`` (an IndexRun).

Reads a KnowledgeBase's sources, chunks them with the embedding model's tokenizer, embeds
the chunks and writes them into a new versioned collection ``<alias>-v<N>``; only when every
chunk is written does the alias move to it (one step), then versions beyond
``qdrant.keepCollections`` are deleted. A build that fails leaves the alias where it was and
deletes its unfinished collection, so users keep querying the previous index.

Refreshes are incremental: each chunk carries the hash of the text its vector was computed
from (and of the model), and a chunk whose hash is in the active collection gets that
collection's vector copied into the new version instead of being embedded again. Copying
into a new version, rather than updating the active collection in place, keeps every
property of a full build: readers never see a half-updated index, a failed refresh changes
nothing, the previous version stays for rollback, and documents that disappeared from the
sources are simply absent from the new version. When nothing changed at all (same chunks,
same settings) no version is created.

The pipeline overlaps its stages: a thread reads and chunks documents while the main thread
embeds, and another thread upserts finished batches; chunks are embedded from the token ids
the chunker produced, sorted by length within a window to keep padding low.

Progress and final statistics go to the reporter (the KnowledgeBase status) and, with
``metricsPort``, to Prometheus. ``--delete`` removes the alias and every version instead
(the KnowledgeBase was deleted). Exit codes: 0 done, 2 a problem the user can fix (the
reason and message also go to /dev/termination-log), 1 anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from qdrant_client.http.exceptions import ResponseHandlingException

from tailor.api.workloads import IndexRun, OwnerRef
from tailor.observability.exposition import serve
from tailor.workloads.errors import RetryableError
from tailor.workloads.io.sources import source_files
from tailor.workloads.knowledge.adaptation import Adapted, adapt, prune
from tailor.workloads.knowledge.chunking import Chunk, Chunker
from tailor.workloads.knowledge.documents import Document, read_documents
from tailor.workloads.knowledge.retriever import Embedder, load_embedder
from tailor.workloads.knowledge.vectorstore import (
    Bm25,
    Collection,
    PointData,
    VectorStore,
    average_words,
    open_store,
    point_id,
)
from tailor.workloads.program import limit_cpu_threads, run_main
from tailor.workloads.progress import ProgressReporter, make_reporter

log = logging.getLogger("tailor.workloads.knowledge.index")

WINDOW_BATCHES = 8
"""Chunks are sorted by length within windows of this many embedding batches."""

T = TypeVar("T")


@dataclass
class IndexStats:
    """What a build did."""

    alias: str
    collection: str | None = None
    """The version this build writes; after a build that changed nothing, the active one."""
    previous: str | None = None
    """The version the alias pointed at when the build started."""
    documents: int = 0
    chunks: int = 0
    embedded: int = 0
    """Chunks embedded by this build; the rest had their vectors copied."""
    reused: int = 0
    vectors: int = 0
    seconds: float = 0.0
    content_hash: str = ""
    changed: bool = True
    """False when the sources and settings matched the active index: no version was made."""

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def status(self, phase: str) -> dict[str, Any]:
        """The KnowledgeBase status patch; ``collection`` is the active one while indexing.
        ``phase`` is where the build stands (Indexing, Ready); the status phase itself is
        the operator's alone to write."""
        patch: dict[str, Any] = {
            "documents": self.documents,
            "chunks": self.chunks,
            "embedded": self.embedded,
            "collection": self.collection if phase == "Ready" else self.previous,
            "alias": self.alias,
        }
        if phase == "Ready":
            patch |= {
                "vectors": self.vectors,
                "indexSeconds": round(self.seconds, 3),
                "contentHash": self.content_hash,
                "lastIndexed": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        return patch


@dataclass
class _Item:
    """A chunk ready to be written: its hash, point id and (once known) vector."""

    chunk: Chunk
    hash: str
    point_id: str
    vector: list[float] | None = None


class IndexMetrics:
    """The workload's Prometheus metrics, served on ``metrics_port`` when one is set."""

    def __init__(self, owner: OwnerRef, port: int | None = None):
        self.registry = CollectorRegistry()
        names = ("namespace", "name")
        values = (owner.namespace, owner.name)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, names, registry=self.registry).labels(*values)

        self.documents = gauge("tailor_index_documents", "Documents in the index just built.")
        self.chunks = gauge("tailor_index_chunks", "Chunks in the index just built.")
        self.duration = gauge("tailor_index_duration_seconds", "Duration of the last build.")
        self.last_success = gauge(
            "tailor_index_last_success_timestamp_seconds", "When the last build finished."
        )
        self.embedded = PromCounter(
            "tailor_index_embedded_chunks",
            "Chunks embedded (unchanged chunks are copied, not counted).",
            names,
            registry=self.registry,
        ).labels(*values)
        self.port = port
        if port is not None:
            serve(port, registry=self.registry)

    def finished(self, stats: IndexStats) -> None:
        self.documents.set(stats.documents)
        self.chunks.set(stats.chunks)
        self.duration.set(stats.seconds)
        self.last_success.set(time.time())


def build_index(
    run: IndexRun,
    reporter: ProgressReporter | None = None,
    store: VectorStore | None = None,
    metrics: IndexMetrics | None = None,
) -> IndexStats:
    """Build (or refresh) the index of ``run`` and move its alias; see the module docstring."""
    started = time.monotonic()
    alias = run.target.alias
    stats = IndexStats(alias=alias)
    for source in run.spec.sources:  # fail fast on missing files, before loading the model
        if source.s3 is None:  # (an s3:// source is listed when it is read: one download)
            source_files(source, run.paths)
    embedder = load_embedder(run.spec.embedding, run.paths)
    chunker = Chunker(embedder.tokenizer, run.spec.chunking, embedder.max_tokens)
    chunks: list[Chunk] | None = None
    adapted: Adapted | None = None
    if run.spec.adaptation is not None:
        # Training needs every chunk first: read them once, and index the same list.
        chunks = list(_chunks(run, chunker, stats))
        adapted = _adapt(run, embedder, chunks, reporter)
        embedder = adapted.embedder
    settings = json.dumps(
        {
            "embedding": embedder.key,
            "shards": run.target.qdrant.shards,
            "replicas": run.target.qdrant.replicas,
            "quantization": run.target.qdrant.quantization,
            "bm25": f"qdrant-edge/{run.spec.retrieval.language}",
        },
        sort_keys=True,
    )
    own_store = store is None
    store = store or open_store(run.target, run.paths, timeout_seconds=60)
    try:
        store.discard_unpublished(alias)
        active = stats.previous = store.active(alias)
        previous: _Previous | None = None
        previous_meta: dict[str, Any] = {}
        if active is not None and run.mode == "incremental":
            old = store.reader(active)
            previous_meta = old.metadata()
            ids = {str(payload["hash"]): id_ for id_, payload in old.scroll(["hash"])}
            previous = _Previous(old, ids)
            log.info("incremental: %d chunks in %s can be reused", len(ids), active)
        name = store.next_version(alias)
        stats.collection = name
        collection = store.create(
            name,
            embedder.dimension,
            run.target.qdrant,
            metadata={
                "tailorAlias": alias,
                "tailorSettings": settings,
                "tailorEmbedder": adapted.folder if adapted else None,
            },
        )
        log.info("building %s (%s mode)", name, run.mode)
        if reporter:
            reporter.report(stats.status("Indexing"), final=True)
        try:
            with _Writer(collection) as writer:
                known = adapted.vectors if adapted else {}
                pending = chunks if chunks is not None else _chunks(run, chunker, stats)
                _fill(run, embedder, pending, known, writer, previous, stats, reporter, metrics)
            if chunker.truncated:
                log.warning(
                    "%d documents are longer than the %d tokens the embedding model reads; their "
                    "vectors cover the beginning only (use chunking strategy recursive)",
                    chunker.truncated,
                    chunker.max_tokens,
                )
            stats.vectors = collection.count()
            if stats.vectors != stats.chunks:
                raise RuntimeError(f"{name} holds {stats.vectors} points for {stats.chunks} chunks")
            # kept with the version, for the next refresh to compare with
            collection.set_metadata(
                {"tailorContentHash": stats.content_hash, "tailorChunks": stats.chunks}
            )
            store.finish(name)
        except BaseException:
            log.warning("build of %s failed; %s stays on %s", name, alias, active)
            store.delete(name)
            raise
        unchanged = (
            previous_meta.get("tailorContentHash") == stats.content_hash
            and previous_meta.get("tailorSettings") == settings
        )
        if unchanged:
            log.info("nothing changed since %s; keeping it", active)
            store.delete(name)
            stats.collection, stats.changed = active, False
        else:
            store.publish(alias, name)
            pruned = store.prune(alias, run.target.qdrant.keep_collections)
            log.info("%s -> %s; deleted %s", alias, name, pruned or "nothing")
            if run.target.embedders:
                _prune_embedders(store, alias, Path(run.target.embedders))
    finally:
        if own_store:
            store.close()
    stats.seconds = time.monotonic() - started
    if metrics:
        metrics.finished(stats)
    if reporter:
        reporter.report(stats.status("Ready"), final=True)
    log.info(
        "%s: %d documents, %d chunks (%d embedded, %d copied), %.1fs, %.1f chunks/s",
        stats.collection,
        stats.documents,
        stats.chunks,
        stats.embedded,
        stats.reused,
        stats.seconds,
        stats.chunks_per_second,
    )
    return stats


@dataclass
class _Previous:
    """The active version a refresh copies unchanged vectors from."""

    collection: Collection
    ids: dict[str, str]
    """Point id of each chunk hash in the active version."""

    def vectors(self, hashes: Iterable[str]) -> dict[str, list[float]]:
        """The dense vectors of the given chunk hashes that the active version holds."""
        wanted = {self.ids[h]: h for h in hashes if h in self.ids}
        if not wanted:
            return {}
        found = self.collection.dense_vectors(list(wanted))
        return {wanted[id_]: vector for id_, vector in found.items()}


def _documents(run: IndexRun) -> Iterator[Document]:
    return read_documents(run.spec.sources, run.spec.format, run.paths)


def _counted(documents: Iterable[Document], stats: IndexStats) -> Iterator[Document]:
    for document in documents:
        stats.documents += 1
        yield document


def _chunks(run: IndexRun, chunker: Chunker, stats: IndexStats) -> Iterator[Chunk]:
    """Every chunk of the sources, read as they are consumed."""
    return chunker.chunks(_counted(_documents(run), stats))


def _adapt(
    run: IndexRun, embedder: Embedder, chunks: list[Chunk], reporter: ProgressReporter | None
) -> Adapted:
    """spec.adaptation: the model to index with, and its held-out scores in the status."""
    assert run.spec.adaptation is not None
    if not run.target.embedders:
        raise ValueError("an IndexRun with spec.adaptation needs target.embedders")

    def progress(step: int, total: int) -> None:
        if step == total or step % max(1, total // 10) == 0:
            log.info("adaptation: step %d of %d", step, total)

    adapted = adapt(
        run.spec.adaptation,
        embedder,
        chunks,
        run.paths,
        Path(run.target.embedders),
        batch_size=run.spec.embedding.batch_size,
        progress=progress,
    )
    if reporter:
        reporter.report({"adaptation": adapted.status.model_dump(by_alias=True)}, final=True)
    return adapted


def _prune_embedders(store: VectorStore, alias: str, embedders: Path) -> None:
    """Delete tuned embedding models that no remaining version of ``alias`` reads."""
    used = set()
    for version in store.versions(alias):
        try:
            used.add(store.version_metadata(version).get("tailorEmbedder"))
        except Exception as exc:  # unreadable: keep every model rather than guess
            log.warning("cannot read %s's metadata (%s); keeping every tuned model", version, exc)
            return
    removed = prune(embedders, {name for name in used if name})
    if removed:
        log.info("deleted tuned embedding models no version uses: %s", removed)


def _fill(
    run: IndexRun,
    embedder: Embedder,
    chunks: Iterable[Chunk],
    known: dict[str, Any],
    writer: _Writer,
    previous: _Previous | None,
    stats: IndexStats,
    reporter: ProgressReporter | None,
    metrics: IndexMetrics | None,
) -> None:
    """Embed (or copy) and write every chunk; ``known`` holds vectors already computed with
    ``embedder``, by chunk text."""
    batch_size = run.spec.embedding.batch_size
    window_size = batch_size * WINDOW_BATCHES
    bm25: Bm25 | None = None
    content = hashlib.sha256()
    items = _items(chunks, embedder.key)
    with _Background(items, maxsize=window_size) as produced:
        for window in _windows(produced, window_size):
            if bm25 is None:  # BM25's average length, from the first window of chunks
                language = run.spec.retrieval.language
                bm25 = Bm25(language, average_words([item.chunk.text for item in window]))
            vectors = previous.vectors(item.hash for item in window) if previous else {}
            stats.reused += sum(1 for item in window if item.hash in vectors)
            for item in window:  # computed by adaptation: embedded by this build all the same
                if item.hash not in vectors and item.chunk.text in known:
                    vectors[item.hash] = known[item.chunk.text].tolist()
                    stats.embedded += 1
            # the rest, each distinct text once, longest first to keep padding low
            fresh = {item.hash: item for item in window if item.hash not in vectors}
            ordered = sorted(fresh.values(), key=lambda item: -len(item.chunk.token_ids))
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                embedded = embedder.embed_token_ids([item.chunk.token_ids for item in batch])
                vectors |= {item.hash: v.tolist() for item, v in zip(batch, embedded, strict=True)}
                stats.embedded += len(batch)
                if metrics:
                    metrics.embedded.inc(len(batch))
            for item in window:
                content.update(_content_line(item).encode("utf-8"))
            writer.put([_point(item, vectors[item.hash], bm25) for item in window])
            stats.chunks += len(window)
            if reporter:
                reporter.report(stats.status("Indexing"))
    stats.content_hash = content.hexdigest()


def _point(item: _Item, vector: list[float], bm25: Bm25) -> PointData:
    """The Qdrant point of a chunk: dense and BM25 vectors, and the payload readers get."""
    chunk = item.chunk
    return PointData(
        id=item.point_id,
        dense=vector,
        sparse=bm25.document(chunk.text),
        payload={
            "document_id": chunk.document.id,
            "source": chunk.document.source,
            "title": chunk.document.title,
            "position": chunk.position,
            "text": chunk.text,
            "hash": item.hash,
            "metadata": chunk.document.metadata,
        },
    )


def _items(chunks: Iterable[Chunk], model_key: str) -> Iterator[_Item]:
    """Chunks with their content hash and a point id stable across builds."""
    current: str | None = None
    seen: Counter[str] = Counter()
    for chunk in chunks:
        if chunk.document.id != current:
            current, seen = chunk.document.id, Counter()
        digest = hashlib.sha256(f"{model_key}\n{chunk.text}".encode()).hexdigest()
        seen[digest] += 1
        key = f"{chunk.document.id}\n{seen[digest]}\n{digest}"
        yield _Item(chunk, digest, point_id(key))


def _content_line(item: _Item) -> str:
    chunk = item.chunk
    metadata = json.dumps(chunk.document.metadata, sort_keys=True, default=str)
    fields = (chunk.document.id, str(chunk.position), item.hash, chunk.document.source)
    return "\t".join((*fields, chunk.document.title or "", metadata)) + "\n"


def _windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    window: list[T] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


_DONE = object()


class _Background(Generic[T]):
    """Runs an iterator in a thread, handing its items over through a bounded queue."""

    def __init__(self, source: Iterator[T], maxsize: int):
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)

    def __enter__(self) -> Iterator[T]:
        self._thread.start()
        return self._iterate()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def _run(self, source: Iterator[T]) -> None:
        error: BaseException | None = None
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as exc:
            error = exc
        self._put((_DONE, error))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _iterate(self) -> Iterator[T]:
        while True:
            item, error = self._queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item


class _Writer:
    """Upserts batches of points in a thread, so that writing overlaps embedding."""

    def __init__(self, collection: Collection, depth: int = 2):
        self.collection = collection
        self._queue: queue.Queue[list[PointData] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if kind is None and self._error is not None:
            raise self._error

    def put(self, points: list[PointData]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(points)

    def _run(self) -> None:
        while (points := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so that put() never blocks
            try:
                self.collection.upsert(points)
            except BaseException as exc:
                self._error = exc


def delete_index(run: IndexRun) -> list[str]:
    """Remove the alias and every version of a knowledge base's index."""
    store = open_store(run.target, run.paths, timeout_seconds=60)
    try:
        removed = store.remove(run.target.alias)
    finally:
        store.close()
    log.info("removed %s and %s", run.target.alias, removed or "no collections")
    return removed


def main(argv: list[str] | None = None) -> int:
    """``--spec FILE`` builds the index; ``--spec FILE --delete`` removes it."""
    limit_cpu_threads()
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--delete", action="store_true", help="remove the index instead")
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    def work(run: IndexRun) -> None:
        try:
            if options.delete:
                delete_index(run)
            else:
                reporter = make_reporter(run.reporter, run.owner)
                build_index(run, reporter, metrics=IndexMetrics(run.owner, run.metrics_port))
        except ResponseHandlingException as exc:
            raise RetryableError("StoreUnavailable", f"Qdrant is unreachable: {exc}") from exc

    return run_main(IndexRun, work, rest)


if __name__ == "__main__":
    sys.exit(main())
