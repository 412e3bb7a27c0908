"""Benchmark of the serving workload (not a test): ``python tests/bench/bench_serve.py``.

Prints, from one run on this machine:

1. Throughput: completion tokens/s of the OpenAI-compatible server (continuous batching,
   real HTTP on 127.0.0.1) at concurrency 1, 8 and 16, next to a baseline of sequential
   ``model.generate`` calls on the same prompts, and next to llama.cpp
   (llama-cpp-python, when installed) on the same GGUF file. Every request is greedy with
   the same ``max_tokens``, prompts are APIBench questions, the response cache is off.
2. Quantization: resident memory and perplexity on held-out text (the APIBench API
   descriptions) with ``quantization: none`` and ``int8`` (dynamic int8), each measured in
   a fresh subprocess, plus their single-stream and 16-stream tokens/s.

Options: ``--max-tokens`` (default 48), ``--skip-llama-cpp``, ``--skip-quantization``,
``--llama-python PATH`` (llama.cpp measured by that interpreter: a throwaway venv with
llama-cpp-python, see ``llama_cpp_rates.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
from tailor.data import apibench_dir  # noqa: E402

APIBENCH = apibench_dir()
SERVED = "bench"
sys.path.insert(0, str(ROOT))
from tests.workloads.helpers import ThreadServer  # noqa: E402


def questions(count: int) -> list[str]:
    """APIBench eval instructions: realistic, varied prompts."""
    out = []
    with (APIBENCH / "torchhub_eval.json").open() as fh:
        for line in fh:
            if line.strip():
                code = json.loads(line)["code"]
                out.append(code.split("###Output")[0].replace("###Instruction:", "").strip())
            if len(out) == count:
                break
    return out


def descriptions() -> list[str]:
    """Held-out text for perplexity: the API descriptions (never trained on here)."""
    with (APIBENCH / "torchhub_api.jsonl").open() as fh:
        return [json.loads(line)["description"] for line in fh if line.strip()]


def serve_run(quantization: str) -> Any:
    from tailor.api.workloads import ServeRun

    return ServeRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "quantization": quantization,
                "cache": {"enabled": False},
                "batching": {"maxBatchSize": 16},
            },
            "servedName": SERVED,
            "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": SERVED},
            "paths": {"artifacts": "/tmp/tailor-bench"},
        }
    )


def server_throughput(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> float:
    """Completion tokens/s with ``concurrency`` clients sharing ``prompts`` (HTTP, greedy)."""
    import httpx

    async def client(http: httpx.AsyncClient, mine: list[str]) -> int:
        tokens = 0
        for prompt in mine:
            body = {
                "model": SERVED,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            response = await http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    async def everyone() -> int:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            shares = [prompts[i::concurrency] for i in range(concurrency)]
            return sum(await asyncio.gather(*(client(http, s) for s in shares)))

    started = time.perf_counter()
    tokens = asyncio.run(everyone())
    return tokens / (time.perf_counter() - started)


def generate_baseline(engine: Any, prompts: list[str], max_tokens: int) -> float:
    """Completion tokens/s of sequential ``model.generate`` calls (batch 1, greedy)."""
    import torch

    with torch.inference_mode():  # warm-up
        engine.model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = engine.encode_chat([{"role": "user", "content": prompt}])
            out = engine.model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False
            )
            tokens += out.shape[1] - len(ids)
    return tokens / (time.perf_counter() - started)


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(model: Any) -> int:
    """Bytes of the model's weights: float tensors plus dynamic-int8 packed weights."""
    import torch

    tensors = {  # tied weights (embedding and lm_head) once
        t.data_ptr(): t
        for t in model.state_dict().values()
        if isinstance(t, torch.Tensor) and not t.is_quantized
    }
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() + (bias.numel() * 4 if bias is not None else 0)
    return total


def quantization_child(quantization: str, max_tokens: int) -> dict[str, float]:
    """Run in a fresh process: memory, perplexity and tokens/s of one quantization."""
    import torch

    from tailor.workloads.serving.engine.base import SamplingParams
    from tailor.workloads.serving.engine.builtin import load_engine

    torch.manual_seed(0)
    before = rss_mib()
    run = serve_run(quantization)
    engine = load_engine(run.spec, [], run.paths)
    loaded = rss_mib()
    with torch.inference_mode():  # one short forward pass reads every weight (mmap or not)
        engine.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    used = rss_mib()

    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in descriptions():
            ids = engine.tokenizer(text, return_tensors="pt").input_ids[:, :512]
            if ids.shape[1] < 2:
                continue
            loss = engine.model(input_ids=ids, labels=ids).loss.item()
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    perplexity = math.exp(nll / count)

    prompts = questions(32)
    params = SamplingParams(max_tokens=max_tokens)
    encoded = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    engine.generate(encoded[0], None, SamplingParams(max_tokens=4))  # warm-up
    started = time.perf_counter()
    single = sum(engine.generate(ids, None, params).completion_tokens for ids in encoded[:4])
    single_rate = single / (time.perf_counter() - started)
    results: list[int] = []

    def one(ids: list[int]) -> None:
        results.append(engine.generate(ids, None, params).completion_tokens)

    threads = [threading.Thread(target=one, args=(ids,)) for ids in encoded[:16]]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batched_rate = sum(results) / (time.perf_counter() - started)
    peak = rss_mib()
    engine.close()
    return {
        "rss_before_mib": before,
        "rss_loaded_mib": loaded,
        "model_mib": used - before,
        "weights_mib": weight_bytes(engine.model) / 2**20,
        "rss_peak_mib": peak,
        "perplexity": perplexity,
        "tokens": count,
        "tokens_per_second_1": single_rate,
        "tokens_per_second_16": batched_rate,
    }


def measure_quantization(max_tokens: int) -> dict[str, dict[str, float]]:
    out = {}
    for quantization in ("none", "int8"):
        child = subprocess.run(
            [sys.executable, __file__, "--child", quantization, "--max-tokens", str(max_tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[quantization] = json.loads(child.stdout.strip().splitlines()[-1])
    return out


def throughput(args: argparse.Namespace) -> None:
    """The throughput table: the server at several concurrencies, the baselines."""
    from tailor.workloads.io.sources import builtin_path
    from tailor.workloads.serving.app import create_app
    from tailor.workloads.serving.engine.builtin import load_engine

    run = serve_run("none")
    engine = load_engine(run.spec, [], run.paths)
    prompts = questions(48)
    rows: list[tuple[str, float]] = []

    baseline = generate_baseline(engine, prompts[:4], args.max_tokens)
    rows.append(("transformers model.generate, sequential", baseline))
    with ThreadServer(create_app(run, engine=engine)) as server:
        server_throughput(server.url, prompts[:2], 2, 4)  # warm-up
        for concurrency, count in ((1, 4), (8, 16), (16, 32)):
            rate = server_throughput(server.url, prompts[:count], concurrency, args.max_tokens)
            rows.append((f"tailor serve, concurrency {concurrency}", rate))
    engine.close()

    if not args.skip_llama_cpp:
        gguf = builtin_path("smollm2-135m-instruct")
        job = {
            "gguf": str(gguf),
            "prompts": prompts,
            "max_tokens": args.max_tokens,
            "threads": os.cpu_count() or 2,
            "runs": [[1, 4], [8, 16], [16, 32]],
        }
        python = args.llama_python
        if python is None:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama-cpp-python is not installed (see --llama-python): skipping llama.cpp")
            else:
                python = sys.executable
        if python is not None:
            child = subprocess.run(
                [python, str(Path(__file__).with_name("llama_cpp_rates.py"))],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                check=True,
            )
            for concurrency, rate in json.loads(child.stdout.strip().splitlines()[-1]):
                rows.append((f"llama.cpp ({gguf.name}), concurrency {concurrency}", rate))

    print(f"\nThroughput (completion tokens/s, greedy, max_tokens={args.max_tokens})")
    print(f"{'system':<62} {'tokens/s':>9} {'x baseline':>10}")
    for name, rate in rows:
        print(f"{name:<62} {rate:>9.1f} {rate / baseline:>9.2f}x")


def quantization_table(max_tokens: int) -> None:
    """The quantization table: none against int8, each in a fresh process."""
    results = measure_quantization(max_tokens)
    print(
        "\nQuantization (fresh process each; model MiB: resident memory after loading and "
        "one forward pass, minus before loading; perplexity on the APIBench API descriptions)"
    )
    header = (
        f"{'quantization':<13} {'weights MiB':>11} {'model MiB':>9} {'RSS peak MiB':>12} "
        f"{'perplexity':>10} {'tok/s c=1':>9} {'tok/s c=16':>10}"
    )
    print(header)
    for name, r in results.items():
        print(
            f"{name:<13} {r['weights_mib']:>11.0f} {r['model_mib']:>9.0f} "
            f"{r['rss_peak_mib']:>12.0f} "
            f"{r['perplexity']:>10.3f} {r['tokens_per_second_1']:>9.1f} "
            f"{r['tokens_per_second_16']:>10.1f}"
        )
    none, int8 = results["none"], results["int8"]
    print(
        f"int8 vs none: weights {int8['weights_mib'] / none['weights_mib']:.2f}x, "
        f"resident {int8['model_mib'] / none['model_mib']:.2f}x, "
        f"perplexity {int8['perplexity'] / none['perplexity'] - 1:+.1%} "
        f"({int8['tokens']:.0f} tokens)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument(
        "--llama-python",
        help="a Python with llama-cpp-python (a throwaway venv; see llama_cpp_rates.py)",
    )
    parser.add_argument("--skip-quantization", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(quantization_child(args.child, args.max_tokens)))
        return

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_quantization:
        quantization_table(args.max_tokens)


if __name__ == "__main__":
    main()
