"""Benchmark of the builtin engine's prefix cache (not a test):
``python tests/bench/bench_prefix.py``.

Prompts as a PromptProfile builds them (a system prompt, few-shot examples from the
APIBench training questions, then the user's question), answered by two engines on the
same SmolLM2 weights in one run: with the prefix cache and without it. Printed: time to
first token (median and p90 over the questions, one request at a time, alternating
engines) and the tokens/s of 16 concurrent clients, plus the prompt tokens reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tailor.api.modeldeployment import ModelDeploymentSpec  # noqa: E402
from tailor.api.workloads import Paths  # noqa: E402
from tailor.data import apibench_dir  # noqa: E402
from tailor.observability.serving import ServingMetrics  # noqa: E402
from tailor.workloads.serving.engine.base import SamplingParams  # noqa: E402
from tailor.workloads.serving.engine.builtin import Engine  # noqa: E402
from tailor.workloads.serving.engine.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (apibench_dir() / "torchhub_train.json").open()]
    asks = [r["code"].split("###Output")[0].replace("###Instruction:", "").strip() for r in rows]
    calls = [r["api_call"] for r in rows]
    system = ("You are an assistant for the PyTorch Hub. Answer with the one API call that "
              "does what the user asks, as `torch.hub.load(...)`, and nothing else.")  # fmt: skip
    shots = []
    for ask, call in zip(asks[: args.examples], calls[: args.examples], strict=True):
        shots += [{"role": "user", "content": ask}, {"role": "assistant", "content": call}]
    questions = asks[args.examples : args.examples + args.questions]

    spec = ModelDeploymentSpec.model_validate({"baseModel": {"builtin": "smollm2-135m-instruct"}})
    model, tokenizer, _ = load_model(spec, [], Paths(artifacts=str(ROOT / ".bench-artifacts")))
    metrics = ServingMetrics("bench")
    engines = {
        "prefix cache": Engine(model, tokenizer, max_batch_size=16, metrics=metrics),
        "no prefix cache": Engine(model, tokenizer, max_batch_size=16, prefix_cache_tokens=0),
    }
    prompts = [
        engines["prefix cache"].encode_chat(
            [{"role": "system", "content": system}, *shots, {"role": "user", "content": q}]
        )
        for q in questions
    ]
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens; {args.examples} examples; greedy, {args.max_tokens} new tokens")  # fmt: skip
    for engine in engines.values():  # warm-up (and the cache's first, computed, prompt)
        engine.generate(prompts[0], None, SamplingParams(max_tokens=2))

    ttft: dict[str, list[float]] = {name: [] for name in engines}
    params = SamplingParams(max_tokens=1)
    for prompt in prompts:
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.generate(prompt, None, params)
            ttft[name].append(time.perf_counter() - started)

    rates = {}
    for name, engine in engines.items():
        todo, lock, tokens = list(prompts), threading.Lock(), [0]

        def client(engine: Engine = engine, todo: list = todo, lock=lock, tokens=tokens) -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop()
                done = engine.generate(prompt, None, SamplingParams(max_tokens=args.max_tokens))
                with lock:
                    tokens[0] += done.completion_tokens

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates[name] = tokens[0] / (time.perf_counter() - started)

    print("| engine | TTFT median ms | TTFT p90 ms | 16 clients tok/s |")
    print("|---|---:|---:|---:|")
    for name in engines:
        values = sorted(ttft[name])
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"| {name} | {1000 * statistics.median(values):.0f} | {1000 * p90:.0f} "
              f"| {rates[name]:.1f} |")  # fmt: skip
    reused = metrics.value("tailor_serve_prefix_cache_tokens_total", result="reused")
    computed = metrics.value("tailor_serve_prefix_cache_tokens_total", result="computed")
    print(f"prompt tokens reused {reused:.0f}, computed {computed:.0f} (prefix cache engine)")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
