"""Benchmark of the serving workload (not a test): ``python tests/bench/bench_serve.py``.

Prints, from one run on this machine:

1. Throughput: completion tokens/s of the OpenAI-compatible server (continuous batching,
   real HTTP on 127.0.0.1) with the builtin and the llamacpp engines at concurrency 1, 8
   and 16, next to a baseline of sequential ``model.generate`` calls on the same prompts,
   and next to llama.cpp's own loop (llama-cpp-python's ``Llama``) on the same GGUF file.
   Every request is greedy with the same ``max_tokens``, prompts are APIBench questions,
   the response cache is off.
2. Quantization: resident memory and perplexity on held-out text (the APIBench API
   descriptions) with ``quantization: none`` and ``int8`` (dynamic int8), each measured in
   a fresh subprocess, plus their single-stream and 16-stream tokens/s.

3. The llamacpp engine: 16 clients on the base model, one adapter, and mixed adapters; time
   to the first token under a 1,000-token few-shot prompt with and without prefix reuse
   (both in-process engines); perplexity and speed of each GGUF type beside float; what
   enforcing a JSON schema costs per token, Tailor's xgrammar bitmask against llama.cpp's
   own grammar sampler.

Options: ``--max-tokens`` (default 48), ``--skip-throughput``, ``--skip-quantization``,
``--skip-llamacpp`` (the tables of 3).
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


def serve_run(quantization: str, engine: str = "builtin") -> Any:
    from tailor.api.workloads import ServeRun

    return ServeRun.model_validate(
        {
            "spec": {
                "baseModel": {"builtin": "smollm2-135m-instruct"},
                "engine": engine,
                "quantization": quantization,
                "cache": {"enabled": False},
                "batching": {"maxBatchSize": 16},
            },
            "servedName": SERVED,
            "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": SERVED},
            "paths": {"artifacts": "/tmp/tailor-bench"},
        }
    )


def server_throughput(
    url: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    models: list[str] | None = None,
) -> float:
    """Completion tokens/s with ``concurrency`` clients sharing ``prompts`` (HTTP, greedy);
    client i asks ``models[i % len(models)]`` (default: the base model)."""
    import httpx

    models = models or [SERVED]

    async def client(http: httpx.AsyncClient, mine: list[str], model: str) -> int:
        tokens = 0
        for prompt in mine:
            body = {
                "model": model,
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
            return sum(
                await asyncio.gather(
                    *(client(http, s, models[i % len(models)]) for i, s in enumerate(shares))
                )
            )

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
            [
                sys.executable,
                __file__,
                "--child",
                f"quantization:{quantization}",
                "--max-tokens",
                str(max_tokens),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[quantization] = json.loads(child.stdout.strip().splitlines()[-1])
    return out


def llama_cpp_loop(prompts: list[str], max_tokens: int, runs: list[list[int]]) -> list[Any]:
    """llama.cpp's own loop (llama-cpp-python's ``Llama``, one sequence at a time) on the
    builtin GGUF: [[concurrency, tokens/s], ...] from ``llama_cpp_rates.py``."""
    from tailor.workloads.io.sources import builtin_path

    job = {
        "gguf": str(builtin_path("smollm2-135m-instruct")),
        "prompts": prompts,
        "max_tokens": max_tokens,
        "threads": os.cpu_count() or 2,
        "runs": runs,
    }
    child = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("llama_cpp_rates.py"))],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    rates: list[Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return rates


def served_rates(engine: Any, run: Any, prompts: list[str], max_tokens: int) -> dict[int, float]:
    """Tokens/s through the gateway (real HTTP) at concurrency 1, 8 and 16."""
    from tailor.workloads.serving.app import create_app

    rates = {}
    with ThreadServer(create_app(run, engine=engine)) as server:
        server_throughput(server.url, prompts[:2], 2, 4)  # warm-up
        for concurrency, count in ((1, 4), (8, 16), (16, 32)):
            rates[concurrency] = server_throughput(
                server.url, prompts[:count], concurrency, max_tokens
            )
    return rates


def serve_child(engine_name: str, max_tokens: int) -> dict[str, Any]:
    """In a fresh process set up as ``python -m tailor.workloads.serving.app`` sets it up:
    tokens/s through the gateway at concurrency 1, 8 and 16 (and sequential
    ``model.generate`` beside the builtin engine)."""
    from tailor.workloads.serving.engine.builtin import load_engine
    from tailor.workloads.serving.engine.llamacpp import load_llama_engine

    prompts = questions(48)
    engine_name, _, quantization = engine_name.partition("/")
    run = serve_run(quantization or "none", engine=engine_name)
    out: dict[str, Any] = {}
    if engine_name == "llamacpp":
        engine: Any = load_llama_engine(run.spec, [], run.paths)
    else:
        engine = load_engine(run.spec, [], run.paths)
        out["generate"] = generate_baseline(engine, prompts[:4], max_tokens)
    out["served"] = served_rates(engine, run, prompts, max_tokens)
    engine.close()
    return out


def child(section: str, *extra: str) -> str:
    """Run ``section`` of this file in a fresh process (nothing another section loaded
    beside it); its stdout."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", section, *extra],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{section}: {done.stderr[-3000:]}")
    return done.stdout


def throughput(args: argparse.Namespace) -> None:
    """The throughput table: both in-process engines through the gateway at several
    concurrencies, sequential ``model.generate`` and llama.cpp's own loop."""
    from tailor.workloads.io.sources import builtin_path

    limits = ["--max-tokens", str(args.max_tokens)]
    builtin = json.loads(child("serve:builtin", *limits).strip().splitlines()[-1])
    llamacpp = json.loads(child("serve:llamacpp", *limits).strip().splitlines()[-1])
    q4_0 = json.loads(child("serve:llamacpp/q4_0", *limits).strip().splitlines()[-1])
    loop = dict(llama_cpp_loop(questions(48), args.max_tokens, [[1, 4], [16, 32]]))
    baseline = builtin["generate"]
    gguf = builtin_path("smollm2-135m-instruct").name
    rows: list[tuple[str, float]] = [("transformers model.generate, sequential", baseline)]
    rows += [
        (f"tailor serve, engine builtin, concurrency {c}", r) for c, r in builtin["served"].items()
    ]
    rows += [
        (f"tailor serve, engine llamacpp ({gguf}), concurrency {c}", r)
        for c, r in llamacpp["served"].items()
    ]
    rows += [
        (f"tailor serve, engine llamacpp (quantization q4_0), concurrency {c}", r)
        for c, r in q4_0["served"].items()
    ]
    rows += [(f"llama.cpp's own loop ({gguf}), concurrency {c}", r) for c, r in loop.items()]
    print(f"\nThroughput (completion tokens/s, greedy, max_tokens={args.max_tokens})")
    print(f"{'system':<66} {'tokens/s':>9} {'x baseline':>10}")
    for name, rate in rows:
        print(f"{name:<66} {rate:>9.1f} {rate / baseline:>9.2f}x")
    single = llamacpp["served"]["1"] / loop[1]
    many = llamacpp["served"]["16"] / builtin["served"]["16"]
    many_q4_0 = q4_0["served"]["16"] / builtin["served"]["16"]
    print(
        f"engine llamacpp single stream / llama.cpp's own loop, same GGUF: {single:.2f}x "
        f"(goal >= 0.8); 16 clients, llamacpp / builtin: {many:.2f}x as shipped, "
        f"{many_q4_0:.2f}x q4_0 (goal >= 2)"
    )


def random_adapters(folder: Path, names: list[str]) -> dict[str, Path]:
    """PEFT LoRA adapters with random weights on every projection (what they say does not
    matter here: what mixing them in one batch costs does)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths
    from tailor.workloads.io.model_loading import load_causal_lm

    out = {}
    for seed, name in enumerate(names):
        model = load_causal_lm(
            ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts="/tmp")
        )
        torch.manual_seed(seed)
        config = LoraConfig(
            r=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
            init_lora_weights=False,
        )
        out[name] = folder / name
        get_peft_model(model, config).save_pretrained(str(out[name]))
    return out


def adapter_mix(args: argparse.Namespace) -> None:
    """16 clients of the llama.cpp engine: all on the base model, all on one adapter, and
    spread over the base and three adapters (one llama_decode per adapter each step)."""
    import tempfile

    from tailor.workloads.serving.engine.llamacpp import load_llama_engine

    prompts = questions(32)
    names = ["a", "b", "c"]
    with tempfile.TemporaryDirectory() as folder:
        adapters = random_adapters(Path(folder), names)
        run = serve_run("none", engine="llamacpp")
        run.adapters = [{"name": n, "path": str(p)} for n, p in adapters.items()]  # type: ignore[misc]
        run = type(run).model_validate(run.model_dump(by_alias=True))
        engine = load_llama_engine(run.spec, run.adapters, run.paths)
        from tailor.workloads.serving.app import create_app

        rows = []
        with ThreadServer(create_app(run, engine=engine)) as server:
            server_throughput(server.url, prompts[:2], 2, 4)
            for label, models in (
                ("base model only", [SERVED]),
                ("adapter a only", [f"{SERVED}/a"]),
                ("base + 3 adapters, mixed", [SERVED] + [f"{SERVED}/{n}" for n in names]),
            ):
                rate = server_throughput(server.url, prompts, 16, args.max_tokens, models=models)
                rows.append((label, rate))
        engine.close()
        one, per_adapter = adapter_contexts([None, *(adapters[n] for n in names)])
    print("\nAdapters on engine llamacpp (16 clients, completion tokens/s)")
    for label, rate in rows:
        print(f"{label:<28} {rate:>9.1f} {rate / rows[0][1]:>6.2f}x")
    print(
        "decode step of 16 sequences over the base and 3 adapters (4 each, 100 cells each, "
        f"median of 30): one context, adapters set per group {one:.1f} ms; one context per "
        f"adapter {per_adapter:.1f} ms"
    )


def adapter_contexts(adapters: list[Path | None]) -> tuple[float, float]:
    """ms per decode step of 4 sequences per adapter: the engine's way (one context, one
    ``llama_decode`` per adapter group, the adapter set before each) against one context
    per adapter (its adapter set once, its own KV cache)."""
    import ctypes
    import statistics

    from tailor.workloads.io.sources import builtin_path
    from tailor.workloads.serving.engine.gguf_files import lora_file
    from tailor.workloads.serving.engine.llamacpp import _llama

    llama = _llama()
    gguf = builtin_path("smollm2-135m-instruct")
    model = llama.llama_model_load_from_file(str(gguf).encode(), llama.llama_model_default_params())
    handles = [
        llama.llama_adapter_lora_init(model, str(lora_file(a, gguf)).encode()) if a else None
        for a in adapters
    ]

    def context(sequences: int) -> Any:
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
        params.n_seq_max, params.kv_unified = sequences, True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 2
        return llama.llama_init_from_model(model, params)

    def use(ctx: Any, handle: Any) -> None:
        if handle is None:
            llama.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (llama.llama_adapter_lora_p_ctypes * 1)(handle)
            llama.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0))

    batch = llama.llama_batch_init(512, 0, 1)

    def decode(ctx: Any, seqs: list[int], position: int, logits: bool) -> None:
        for i, seq in enumerate(seqs):
            for k in range(position if not logits else 1):
                n = i * (position if not logits else 1) + k
                batch.token[n], batch.n_seq_id[n] = 100 + k, 1
                batch.pos[n] = k if not logits else position
                batch.seq_id[n][0], batch.logits[n] = seq, logits
        batch.n_tokens = len(seqs) * (position if not logits else 1)
        assert llama.llama_decode(ctx, batch) == 0

    def steps(groups: list[tuple[Any, Any, list[int]]]) -> float:
        for ctx, handle, seqs in groups:  # 100 cells per sequence first
            use(ctx, handle)
            decode(ctx, seqs, 100, False)
        times = []
        for step in range(30):
            started = time.perf_counter()
            for ctx, handle, seqs in groups:
                use(ctx, handle)
                decode(ctx, seqs, 100 + step, True)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    shared = context(16)
    one = steps([(shared, h, list(range(4 * i, 4 * i + 4))) for i, h in enumerate(handles)])
    own = [context(4) for _ in handles]
    per_adapter = steps([(c, h, [0, 1, 2, 3]) for c, h in zip(own, handles, strict=True)])
    for ctx in [shared, *own]:
        llama.llama_free(ctx)
    llama.llama_batch_free(batch)
    llama.llama_model_free(model)
    return one, per_adapter


def few_shot_system(tokenizer: Any, tokens: int) -> str:
    """A system prompt of APIBench instructions and their API calls, ``tokens`` long."""
    lines = ["Answer with the API call that does what is asked. Examples:"]
    with (APIBENCH / "torchhub_train.json").open() as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            code = record["code"]
            ask = code.split("###Output")[0].replace("###Instruction:", "").strip()
            call = json.dumps(record.get("api_call", ""))
            lines.append(f"Q: {ask}\nA: {call}")
            if len(tokenizer("\n".join(lines)).input_ids) >= tokens:
                break
    return "\n".join(lines)


def time_to_first_token(url: str, messages: list[dict[str, str]]) -> float:
    import httpx

    body = {"model": SERVED, "messages": messages, "max_tokens": 4, "temperature": 0,
            "stream": True}  # fmt: skip
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                return time.perf_counter() - started
    return time.perf_counter() - started


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36}.get(len(values), 2.26)
    return mean, t95 * statistics.stdev(values) / math.sqrt(len(values))


def prefix_ttft(name: str) -> list[Any]:
    """Time to the first token of a question under a 1,000-token few-shot system prompt:
    the first (the prefix computed), then other questions under it (the prefix reused),
    against the same engine without a prefix cache."""
    from tailor.workloads.serving.app import create_app
    from tailor.workloads.serving.engine.builtin import load_engine
    from tailor.workloads.serving.engine.llamacpp import load_llama_engine

    asks = questions(9)
    rows = []
    run = serve_run("none", engine=name)
    for cached in (True, False):
        loader = load_llama_engine if name == "llamacpp" else load_engine
        engine = loader(run.spec, [], run.paths)
        if not cached:
            engine._prefixes = None  # the same engine, its prefix cache off
        system = few_shot_system(engine.tokenizer, 1000)
        length = len(engine.encode_chat([{"role": "system", "content": system}]))
        with ThreadServer(create_app(run, engine=engine)) as server:
            times = [
                time_to_first_token(
                    server.url,
                    [{"role": "system", "content": system}, {"role": "user", "content": q}],
                )
                for q in asks
            ]
        engine.close()
        later, ci = mean_ci(times[1:])
        rows.append((name, cached, length, times[0], later, ci))
    return rows


def prefix_table() -> None:
    rows = [
        row
        for name in ("builtin", "llamacpp")
        for row in json.loads(child(f"prefix:{name}").strip().splitlines()[-1])
    ]
    print("\nTime to first token under a few-shot system prompt (s; 8 later questions, 95% CI)")
    print(f"{'engine':<9} {'prefix cache':<12} {'prompt':>6} {'first':>7} {'later':>16}")
    for name, cached, length, first, later, ci in rows:
        on = "on" if cached else "off"
        print(f"{name:<9} {on:<12} {length:>6} {first:>7.3f} {later:>8.3f} +- {ci:.3f}")


def llama_perplexity(path: Path, texts: list[list[int]]) -> tuple[float, int]:
    """Perplexity of a GGUF file under llama.cpp over token id lists (every position's
    logits from one decode per text)."""
    import numpy as np

    from tailor.workloads.serving.engine.llamacpp import _llama

    llama = _llama()
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
    vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = os.cpu_count() or 2
    ctx = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(512, 0, 1)
    nll, count = 0.0, 0
    for ids in texts:
        llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        batch.n_tokens = len(ids)
        assert llama.llama_decode(ctx, batch) == 0
        logits = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(len(ids), vocab))
        top = logits.max(axis=1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        nll -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)
    return math.exp(nll / count), count


def gguf_quantizations(args: argparse.Namespace) -> None:
    """Perplexity and single-stream speed of each GGUF type the llamacpp engine serves,
    beside float, on the APIBench API descriptions (the texts and tokens of the
    quantization table)."""
    from tailor.api.common import ModelSource
    from tailor.api.workloads import Paths
    from tailor.workloads.io.model_loading import load_tokenizer
    from tailor.workloads.io.sources import builtin_path
    from tailor.workloads.serving.engine.base import SamplingParams
    from tailor.workloads.serving.engine.gguf_files import model_file
    from tailor.workloads.serving.engine.llamacpp import LlamaEngine

    tokenizer = load_tokenizer(
        ModelSource(builtin="smollm2-135m-instruct"), Paths(artifacts="/tmp")
    )
    texts = [tokenizer(t).input_ids[:512] for t in descriptions()]
    texts = [ids for ids in texts if len(ids) >= 2]
    source = builtin_path("smollm2-135m-instruct")
    prompts = questions(4)
    rows = []
    for kind in ("float", "f16", "q8_0", "q4_k_m", "q4_0", "none"):
        path = model_file(source, kind)
        # on a thread of its own that ends: a second OpenMP master left beside the engine's
        # thread would throttle the engine's threads (libgomp spins less with more threads)
        measured: list[tuple[float, int]] = []
        worker = threading.Thread(
            target=lambda out=measured, file=path: out.append(llama_perplexity(file, texts))
        )
        worker.start()
        worker.join()
        perplexity, count = measured[0]
        engine = LlamaEngine(path, tokenizer)
        encoded = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        engine.generate(encoded[0], None, SamplingParams(max_tokens=4))
        started = time.perf_counter()
        tokens = sum(
            engine.generate(ids, None, SamplingParams(max_tokens=args.max_tokens)).completion_tokens
            for ids in encoded
        )
        rate = tokens / (time.perf_counter() - started)
        engine.close()
        label = f"none ({source.name.split('.')[-2]}, as shipped)" if kind == "none" else kind
        rows.append((label, path.stat().st_size / 2**20, perplexity, rate))
    print(
        f"\nGGUF types on engine llamacpp (perplexity on the API descriptions, {count} tokens; "
        "tok/s single stream)"
    )
    print(f"{'type':<26} {'file MiB':>8} {'perplexity':>10} {'vs float':>8} {'tok/s':>7}")
    for label, mib, perplexity, rate in rows:
        print(
            f"{label:<26} {mib:>8.0f} {perplexity:>10.3f} "
            f"{perplexity / rows[0][2] - 1:>+8.1%} {rate:>7.1f}"
        )


def format_overhead(args: argparse.Namespace) -> None:
    """What enforcing a JSON schema costs per token: Tailor's xgrammar bitmask on the
    llamacpp engine against llama.cpp's own GBNF grammar sampler (llama-cpp-python's
    ``Llama`` with ``LlamaGrammar.from_json_schema``), each against free text on the same
    prompts and runtime; every enforced answer checked against the schema."""
    import jsonschema
    from llama_cpp import Llama, LlamaGrammar

    from tailor.workloads.io.sources import builtin_path
    from tailor.workloads.serving.engine.base import SamplingParams
    from tailor.workloads.serving.engine.grammar import format_key
    from tailor.workloads.serving.engine.llamacpp import load_llama_engine

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer"},
            "city": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    asks = [f"Invent a person from {c}." for c in ("Lyon", "Oslo", "Lima", "Kyoto", "Cairo")]
    run = serve_run("none", engine="llamacpp")
    engine = load_llama_engine(run.spec, [], run.paths)
    key = format_key("json_schema", schema)

    def ours(fmt: str | None) -> tuple[float, int]:
        tokens, valid, started = 0, 0, time.perf_counter()
        for ask in asks:
            ids = engine.encode_chat([{"role": "user", "content": ask}])
            out = engine.generate(ids, None, SamplingParams(max_tokens=96, response_format=fmt))
            tokens += out.completion_tokens
            if fmt is not None:
                jsonschema.validate(json.loads(out.text), schema)
                valid += 1
        return (time.perf_counter() - started) / tokens, valid

    ours(None)
    free, _ = ours(None)
    enforced, valid = ours(key)
    engine.close()

    llm = Llama(str(builtin_path("smollm2-135m-instruct")), n_ctx=2048, verbose=False,
                n_threads=os.cpu_count() or 2)  # fmt: skip
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)

    def theirs(with_grammar: bool) -> tuple[float, int]:
        tokens, ok, started = 0, 0, time.perf_counter()
        for ask in asks:
            out: Any = llm.create_chat_completion(
                messages=[{"role": "user", "content": ask}],
                max_tokens=96,
                temperature=0,
                grammar=grammar if with_grammar else None,
            )
            tokens += out["usage"]["completion_tokens"]
            if with_grammar:
                try:
                    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)
                    ok += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
        return (time.perf_counter() - started) / tokens, ok

    their_free, _ = theirs(False)
    their_enforced, their_valid = theirs(True)
    print("\nEnforced JSON schema (ms per completion token, 5 prompts, greedy)")
    print(f"{'how':<44} {'free':>6} {'enforced':>8} {'cost/token':>10} {'valid':>6}")
    for name, a, b, v in (
        ("xgrammar bitmask, engine llamacpp (kept)", free, enforced, valid),
        ("llama.cpp GBNF grammar sampler (Llama)", their_free, their_enforced, their_valid),
    ):
        print(
            f"{name:<44} {a * 1000:>6.2f} {b * 1000:>8.2f} {(b - a) * 1000:>+10.2f} "
            f"{v:>3}/{len(asks)}"
        )


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
    parser.add_argument("--skip-quantization", action="store_true")
    parser.add_argument(
        "--skip-llamacpp",
        action="store_true",
        help="skip the llamacpp engine's own tables (adapters, prefix, GGUF types, formats)",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only", choices=["adapters", "gguf", "formats"], help="one llamacpp table alone"
    )
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.child:
        run_child(args)
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    if args.only:
        print(child(args.only, "--max-tokens", str(args.max_tokens)), end="")
        return
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_quantization:
        quantization_table(args.max_tokens)
    if not args.skip_llamacpp:
        prefix_table()
        for section in ("adapters", "gguf", "formats"):  # each in a fresh process
            print(child(section, "--max-tokens", str(args.max_tokens)), end="")


def run_child(args: argparse.Namespace) -> None:
    """A section in this fresh process, torch's threads set as the serve process sets them."""
    from tailor.workloads.program import limit_cpu_threads

    section, _, name = args.child.partition(":")
    builtin = section == "quantization" or name == "builtin"
    limit_cpu_threads(None if builtin else 1)
    if section == "quantization":
        print(json.dumps(quantization_child(name, args.max_tokens)))
    elif section == "serve":
        print(json.dumps(serve_child(name, args.max_tokens)))
    elif section == "prefix":
        print(json.dumps(prefix_ttft(name)))
    elif section == "adapters":
        adapter_mix(args)
    elif section == "gguf":
        gguf_quantizations(args)
    elif section == "formats":
        format_overhead(args)


if __name__ == "__main__":
    main()
