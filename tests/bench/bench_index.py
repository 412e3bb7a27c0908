"""Benchmark of the index workload at scale: 100k chunks in Qdrant Edge (not a test).

Prints, from one run on one machine:

- ingest: Tailor's index pipeline end to end on all chunks (read, chunk, embed, BM25, write
  to Qdrant Edge, build the HNSW graph, publish) beside the floor, ``SentenceTransformer.
  encode`` on the same chunk texts (same model, batch size and threads), and beside
  LlamaIndex's ``IngestionPipeline`` (SentenceSplitter with the same tokenizer, chunk size
  and overlap, the same local MiniLM through HuggingFaceEmbedding, no vector store) on the
  same documents, as chunks per second. On 2 CPU cores each full pass takes about 50
  minutes, so by default the two baselines run on every 10th document (``--sample 10``; all
  chunks of those documents): their rate per chunk, against Tailor's over all 100k, which
  also pays for the HNSW graph of 100k points. ``--sample 1`` runs them on everything;
- query latency of the published index, p50 / p99: the store alone (query vectors given:
  dense, and hybrid dense + BM25 fused by RRF) and ``Retriever.search`` end to end (which
  also embeds the question);
- the index on disk and the memory of a process that opens it and answers queries (no
  torch: what a reader holds for the index);
- an incremental refresh after 1% of the documents changed: chunks embedded against chunks
  changed, and its time.

The corpus is package-shipped text, reproducible from the venv: the Python source files of
the installed ``transformers`` package in path order, one document per file, chunked
recursively at 128 tokens (overlap 16), as many files as it takes to reach ``--chunks``.

    HF_HUB_OFFLINE=1 python tests/bench/bench_index.py [--chunks 100000] [--skip-llama]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from tailor.api.workloads import IndexRun
from tailor.data import apibench_dir
from tailor.workloads.evaluation.apibench import load_questions
from tailor.workloads.io.sources import builtin_path
from tailor.workloads.knowledge.chunking import Chunker
from tailor.workloads.knowledge.documents import Document
from tailor.workloads.knowledge.index import build_index
from tailor.workloads.knowledge.retriever import Retriever, load_embedder
from tailor.workloads.knowledge.vectorstore import EdgeStore, Search, query_bm25


def make_run(root: Path, chunk_tokens: int, overlap: int, batch_size: int) -> IndexRun:
    return IndexRun.model_validate(
        {
            "owner": {"kind": "KnowledgeBase", "namespace": "bench", "name": "bench"},
            "paths": {"artifacts": str(root / "artifacts"), "pvcs": str(root / "pvc")},
            "reporter": {"kind": "none"},
            "spec": {
                "sources": [{"pvc": {"claimName": "bench", "path": "corpus.jsonl"}}],
                "chunking": {
                    "strategy": "recursive",
                    "chunkTokens": chunk_tokens,
                    "overlapTokens": overlap,
                },
                "embedding": {"batchSize": batch_size},
            },
            "target": {"alias": "bench", "path": str(root / "qdrant")},
            "mode": "incremental",
        }
    )


def write_corpus(
    path: Path, run: IndexRun, chunker: Chunker, target: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Source files of transformers until ``target`` chunks; the documents and chunk texts."""
    package = Path(transformers.__file__).parent
    documents: list[dict[str, Any]] = []
    texts: list[str] = []
    for file in sorted(package.rglob("*.py")):
        text = file.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        name = str(file.relative_to(package))
        document = Document(id=name, text=text, source="bench", title=name, metadata={})
        texts += [chunk.text for chunk in chunker.chunks([document])]
        documents.append({"id": name, "text": text})
        if len(texts) >= target:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return documents, texts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_llama_index(
    documents: list[dict[str, Any]],
    chunk_tokens: int,
    overlap: int,
    batch_size: int,
    tokenizer: Any,
) -> tuple[int, float] | str:
    try:
        from llama_index.core import Document as LlamaDocument
        from llama_index.core.ingestion import IngestionPipeline
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:
        return f"not installed ({exc.name}; it comes with the bench extra)"
    embed = HuggingFaceEmbedding(
        model_name=str(builtin_path("minilm-l6-v2")), embed_batch_size=batch_size, device="cpu"
    )
    splitter = SentenceSplitter(
        chunk_size=chunk_tokens,
        chunk_overlap=overlap,
        tokenizer=lambda text: tokenizer(text, add_special_tokens=False, verbose=False)[
            "input_ids"
        ],
    )
    pipeline = IngestionPipeline(transformations=[splitter, embed])
    docs = [LlamaDocument(text=d["text"], id_=d["id"]) for d in documents]
    started = time.perf_counter()
    nodes = pipeline.run(documents=docs)
    return len(nodes), time.perf_counter() - started


READER = """
import json, sys, time
from tailor.workloads.knowledge.vectorstore import EdgeStore, Search, Sparse
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss()
root, queries = sys.argv[1], json.loads(open(sys.argv[2]).read())
started = time.perf_counter()
collection = EdgeStore(root).searchable("bench")
opened = time.perf_counter() - started
for q in queries:
    collection.query([Search(dense=q["dense"], limit=4)])
    collection.query([Search(dense=q["dense"], limit=4, sparse=Sparse(*q["sparse"]), candidates=16)])
print(json.dumps({"open_s": opened, "rss_mib": rss(), "base_mib": base}))
"""


def folder_mib(path: Path) -> float:
    """Disk blocks in use (the shard's files are sparse: their sizes overstate it)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--sample",
        type=int,
        default=10,
        help="the baselines (encode, LlamaIndex) run on every k-th document; 1: all",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the index in this folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        run = make_run(root, args.chunk_tokens, args.overlap, args.batch_size)
        embedder = load_embedder(run.spec.embedding, run.paths)
        chunker = Chunker(embedder.tokenizer, run.spec.chunking, embedder.max_tokens)
        corpus = root / "pvc" / "bench" / "corpus.jsonl"
        documents, texts = write_corpus(corpus, run, chunker, args.chunks)
        tokens = sum(len(ids) for ids in embedder.token_ids(texts))
        print(
            f"corpus: {len(documents)} source files of transformers {transformers.__version__}, "
            f"{len(texts)} chunks, {tokens} tokens; torch threads {torch.get_num_threads()}",
            flush=True,
        )
        embedder.model.encode(["warm up"] * 8)

        # the baselines run on every k-th document (all of its chunks): a rate per chunk
        sample_ids = {d["id"] for d in documents[:: args.sample]}
        sample_docs = [d for d in documents if d["id"] in sample_ids]
        sample_texts = [
            c.text
            for d in sample_docs
            for c in chunker.chunks(
                [Document(id=d["id"], text=d["text"], source="bench", title=d["id"], metadata={})]
            )
        ]
        started = time.perf_counter()
        embedder.model.encode(sample_texts, batch_size=args.batch_size, normalize_embeddings=True)
        floor_s = time.perf_counter() - started
        print(f"floor: encode {len(sample_texts)} chunks in {floor_s:.1f}s", flush=True)

        started = time.perf_counter()
        stats = build_index(run)
        pipeline_s = time.perf_counter() - started
        assert stats.chunks == len(texts), (stats.chunks, len(texts))
        print(f"tailor: built {stats.collection} in {pipeline_s:.1f}s", flush=True)

        llama = (
            "skipped"
            if args.skip_llama
            else bench_llama_index(
                sample_docs, args.chunk_tokens, args.overlap, args.batch_size, embedder.tokenizer
            )
        )

        chunks = len(texts)
        floor_rate, tailor_rate = len(sample_texts) / floor_s, chunks / pipeline_s
        print(f"\ningest: {chunks} chunks, {tokens} tokens (chunkTokens {args.chunk_tokens})")
        print(f"{'':52s} {'chunks/s':>9s} {'seconds':>8s} {'chunks':>7s} {'ratio':>6s}")
        print(
            f"{'SentenceTransformer.encode, same chunks (floor)':52s} {floor_rate:9.1f} "
            f"{floor_s:8.1f} {len(sample_texts):7d} {1.0:6.2f}"
        )
        print(
            f"{'Tailor index -> Qdrant Edge, HNSW built, published':52s} {tailor_rate:9.1f} "
            f"{pipeline_s:8.1f} {chunks:7d} {tailor_rate / floor_rate:6.2f}"
        )
        if isinstance(llama, str):
            print(f"LlamaIndex IngestionPipeline: {llama}")
        else:
            nodes, seconds = llama
            print(
                f"{'LlamaIndex IngestionPipeline (no store)':52s} {nodes / seconds:9.1f} "
                f"{seconds:8.1f} {nodes:7d} {nodes / seconds / floor_rate:6.2f}"
            )
            print(f"{'Tailor / LlamaIndex':52s} {tailor_rate / (nodes / seconds):9.2f}")

        # --- queries --------------------------------------------------------------------
        apibench = apibench_dir()
        questions = [q.question for q in load_questions(apibench / "torchhub_eval.json")]
        questions += [q.question for q in load_questions(apibench / "huggingface_eval.json")]
        questions = questions[: args.queries]
        vectors = embedder.embed_queries(questions)
        bm25 = query_bm25("english")
        sparse = [bm25.query(q) for q in questions]
        store = EdgeStore(root / "qdrant")
        collection = store.searchable("bench")
        dense = [Search(dense=v.tolist(), limit=4) for v in vectors]
        hybrid = [
            Search(dense=v.tolist(), limit=4, sparse=s, candidates=16)
            for v, s in zip(vectors, sparse, strict=True)
        ]
        print(f"\nquery latency at {chunks} chunks ({len(questions)} APIBench questions, top 4)")
        print(f"{'':46s} {'p50 ms':>8s} {'p99 ms':>8s}")
        for name, searches in (
            ("store: dense (HNSW)", dense),
            ("store: hybrid (dense + BM25, RRF)", hybrid),
        ):
            collection.query(searches[:5])
            latencies = []
            for search in searches:
                started = time.perf_counter()
                collection.query([search])
                latencies.append((time.perf_counter() - started) * 1000)
            print(
                f"{name:46s} {statistics.median(latencies):8.2f} {percentile(latencies, 99):8.2f}"
            )
        for hybrid_mode in (False, True):
            config = run.target.model_copy(
                update={
                    "retrieval": run.target.retrieval.model_copy(update={"hybrid": hybrid_mode})
                }
            )
            retriever = Retriever(config, run.paths)
            retriever.search("warm up")
            latencies = []
            for question in questions:
                started = time.perf_counter()
                retriever.search(question)
                latencies.append((time.perf_counter() - started) * 1000)
            name = "Retriever.search (embeds the question)" + (", hybrid" if hybrid_mode else "")
            print(
                f"{name:46s} {statistics.median(latencies):8.2f} {percentile(latencies, 99):8.2f}"
            )

        # --- the index's footprint ------------------------------------------------------
        version = root / "qdrant" / str(stats.collection)
        queries_file = root / "queries.json"
        queries_file.write_text(
            json.dumps(
                [
                    {"dense": v.tolist(), "sparse": [s.indices, s.values]}
                    for v, s in zip(vectors, sparse, strict=True)
                ]
            )
        )
        reader = subprocess.run(
            [sys.executable, "-c", READER, str(root / "qdrant"), str(queries_file)],
            capture_output=True,
            text=True,
            check=True,
        )
        footprint = json.loads(reader.stdout.strip().splitlines()[-1])
        print(
            f"\nindex: {folder_mib(version):.0f} MiB on disk; a reader process opens it in "
            f"{footprint['open_s']:.1f}s (private copy + load); after the queries its RSS is "
            f"{footprint['rss_mib']:.0f} MiB, {footprint['rss_mib'] - footprint['base_mib']:.0f} "
            f"MiB more than before opening the index"
        )

        # --- refresh 1% of the documents ------------------------------------------------
        changed = documents[:: max(1, len(documents) // max(1, len(documents) // 100))]
        changed = changed[: max(1, len(documents) // 100)]
        names = {d["id"] for d in changed}
        edited = [
            d | {"text": d["text"] + "\n# edited for the refresh benchmark\n"}
            if d["id"] in names
            else d
            for d in documents
        ]
        corpus.write_text("".join(json.dumps(d) + "\n" for d in edited))
        new_chunks = [
            c.text
            for d in edited
            if d["id"] in names
            for c in chunker.chunks(
                [Document(id=d["id"], text=d["text"], source="bench", title=d["id"], metadata={})]
            )
        ]
        must_embed = len(set(new_chunks) - set(texts))  # texts the index holds no vector for
        started = time.perf_counter()
        refresh = build_index(run)
        refresh_s = time.perf_counter() - started
        print(
            f"\nrefresh after {len(changed)} of {len(documents)} documents changed "
            f"({len(new_chunks)} of their chunks, {must_embed} with new text): embedded "
            f"{refresh.embedded}, copied {refresh.reused}, {refresh_s:.1f}s "
            f"(the full build: {pipeline_s:.1f}s)"
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"benchmark process peak RSS {peak:.0f} MiB; cores {os.cpu_count()}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
