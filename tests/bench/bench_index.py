"""Benchmark of the index workload against the embedding model alone (not a test).

Prints, from one run on one machine:

- end-to-end indexing throughput (read, chunk, embed, write to embedded Qdrant, move the
  alias) next to ``SentenceTransformer.encode`` on exactly the same chunk texts, and their
  ratio (the target is at least 0.9: the pipeline should cost little over the model);
- query latency p50 / p99 of ``Retriever.search`` (dense and hybrid) and batch throughput;
- when llama-index-core and llama-index-embeddings-huggingface are importable, LlamaIndex's
  ``IngestionPipeline`` (SentenceSplitter with the same tokenizer and sizes + the same local
  MiniLM through HuggingFaceEmbedding, no vector store) on the same documents.

The corpus is APIBench Torch Hub: the 94 API documents (every field) and the 837 training
questions as documents, chunked recursively. Passes alternate (model, pipeline, model, ...)
and the best of each is kept, which is fair on a machine shared with other work.

    HF_HUB_OFFLINE=1 python tests/bench/bench_index.py [--repeat 2] [--chunk-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from qdrant_client import QdrantClient

from tailor.api.workloads import IndexRun
from tailor.data import apibench_dir
from tailor.workloads.common import builtin_path
from tailor.workloads.index import build_index
from tailor.workloads.retriever import Retriever, load_embedder
from tailor.workloads.vectorstore import scroll_all

APIBENCH = apibench_dir()
FIELDS = [
    "domain",
    "api_name",
    "functionality",
    "description",
    "api_call",
    "api_arguments",
    "performance",
    "example_code",
]


def write_corpus(pvc: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` benchmark documents as a jsonl file; returns them as {id, text}."""
    pvc.mkdir(parents=True)
    apis = [json.loads(line) for line in (APIBENCH / "torchhub_api.jsonl").open() if line.strip()]
    for api in apis:
        api["id"] = api["api_call"]
        api["text"] = "\n".join(
            f"{field}: {api[field] if isinstance(api[field], str) else json.dumps(api[field])}"
            for field in FIELDS
            if api.get(field)
        )
    train = [json.loads(line) for line in (APIBENCH / "torchhub_train.json").open() if line.strip()]
    questions = [{"id": f"train-{i}", "text": row["code"]} for i, row in enumerate(train)]
    documents = ([{"id": d["id"], "text": d["text"]} for d in apis] + questions)[:limit]
    (pvc / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    return documents


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
            "target": {
                "alias": "bench",
                "path": str(root / "qdrant"),
                "qdrant": {"keepCollections": 0},
            },
            "mode": "full",
        }
    )


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
        from llama_index.core import Document
        from llama_index.core.ingestion import IngestionPipeline
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:
        return f"not installed ({exc.name})"
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
    docs = [Document(text=d["text"], id_=d["id"]) for d in documents]
    started = time.perf_counter()
    nodes = pipeline.run(documents=docs)
    return len(nodes), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, default=400, help="documents (at most 931)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        documents = write_corpus(root / "pvc" / "bench", args.limit)
        run = make_run(root, args.chunk_tokens, args.overlap, args.batch_size)
        embedder = load_embedder(run.spec.embedding, run.paths)
        embedder.model.encode(["warm up"] * 8)
        print(f"torch threads: {torch.get_num_threads()}, documents: {len(documents)}")

        pipeline_times: list[float] = []
        model_times: list[float] = []
        chunks = 0
        texts: list[str] = []
        for _ in range(args.repeat):
            if texts:
                started = time.perf_counter()
                embedder.model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
                model_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            stats = build_index(run)
            pipeline_times.append(time.perf_counter() - started)
            chunks = stats.chunks
            if not texts:  # the chunk texts the pipeline embedded, for the model-only pass
                client = QdrantClient(path=str(root / "qdrant" / str(stats.collection)))
                texts = [
                    str((p.payload or {})["text"])
                    for p in scroll_all(client, str(stats.collection), with_payload=["text"])
                ]
                client.close()
                started = time.perf_counter()
                embedder.model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
                model_times.append(time.perf_counter() - started)
        assert len(texts) == chunks
        model_rate = chunks / min(model_times)
        pipeline_rate = chunks / min(pipeline_times)
        tokens = sum(len(ids) for ids in embedder.token_ids(texts))

        print(f"\nindexing {chunks} chunks ({tokens} tokens, chunkTokens {args.chunk_tokens})")
        print(f"{'':44s} {'chunks/s':>9s} {'best s':>8s} {'runs s':>20s}")
        print(
            f"{'SentenceTransformer.encode (same chunks)':44s} {model_rate:9.1f} "
            f"{min(model_times):8.2f} {' '.join(f'{t:.1f}' for t in model_times):>20s}"
        )
        print(
            f"{'tailor index pipeline (end to end)':44s} {pipeline_rate:9.1f} "
            f"{min(pipeline_times):8.2f} {' '.join(f'{t:.1f}' for t in pipeline_times):>20s}"
        )
        print(f"{'ratio pipeline / model':44s} {pipeline_rate / model_rate:9.2f}")

        evals = [
            json.loads(line) for line in (APIBENCH / "torchhub_eval.json").open() if line.strip()
        ]
        questions = [re.split("###(?:Input|Output)", e["code"])[0] for e in evals]
        questions = [q.replace("###Instruction:", "").strip() for q in questions]
        questions = (questions * (args.queries // len(questions) + 1))[: args.queries]
        print(f"\nquery latency ({len(questions)} queries, top 4, {chunks} chunks)")
        print(f"{'':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch q/s':>10s}")
        for hybrid in (False, True):
            config = run.target.model_copy(
                update={"retrieval": run.target.retrieval.model_copy(update={"hybrid": hybrid})}
            )
            retriever = Retriever(config, run.paths)
            retriever.search("warm up")
            latencies = []
            for question in questions:
                started = time.perf_counter()
                retriever.search(question)
                latencies.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            retriever.search_batch(questions)
            batch_rate = len(questions) / (time.perf_counter() - started)
            name = "hybrid (dense + BM25)" if hybrid else "dense"
            print(
                f"{name:24s} {statistics.median(latencies):8.1f} "
                f"{percentile(latencies, 99):8.1f} {batch_rate:10.1f}"
            )

        if not args.skip_llama:
            result = bench_llama_index(
                documents, args.chunk_tokens, args.overlap, args.batch_size, embedder.tokenizer
            )
            print("\npeer baseline on the same documents")
            if isinstance(result, str):
                print(f"LlamaIndex IngestionPipeline: {result}")
            else:
                nodes, seconds = result
                print(
                    f"{'LlamaIndex IngestionPipeline (no store)':44s} {nodes / seconds:9.1f} "
                    f"chunks/s ({nodes} chunks, {seconds:.2f}s)"
                )
                print(
                    f"{'tailor pipeline / LlamaIndex':44s} {pipeline_rate / (nodes / seconds):9.2f}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
