"""The engine's KV slab against transformers' concatenating cache (not a test).

    .venv/bin/python tests/bench/bench_kv.py [--shapes 16x100,16x400,16x1500,1x100] [--rounds 4]

One decode step of the builtin model (SmolLM2-135M, float32, this machine's threads) for
``rows`` sequences with ``length`` tokens of context, the way the engine runs it: with
``DynamicCache`` (what the engine used before the slab: every step concatenates every
layer's cache to append one token) and with :class:`~tailor.workloads.serving.engine.kvcache.KVSlab`
(written in place). Both start from the same prefilled KV, run the same steps, and
alternate in rounds in one process; the timed span is the forward pass. Prints the median
step time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache

from tailor.api.common import ModelSource
from tailor.api.workloads import Paths
from tailor.workloads.io.model_loading import load_causal_lm
from tailor.workloads.serving.engine.kvcache import KVSlab

STEPS = 12  # per round and cache; the first two are not counted


def step_times(model: torch.nn.Module, cache: DynamicCache, rows: int, length: int) -> list[float]:
    slab = isinstance(cache, KVSlab)
    mask = torch.ones(rows, length, dtype=torch.long)
    tokens = torch.randint(100, 1000, (rows,), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(STEPS):
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        if slab:
            cache.reserve(1)
        started = time.perf_counter()
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=torch.full((rows, 1), length + step),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if slab:
            cache.advance(1)
        times.append(time.perf_counter() - started)
        tokens = out.logits[:, -1].argmax(-1)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="16x100,16x400,16x1500,1x100")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    source = ModelSource(builtin="smollm2-135m-instruct")
    model = load_causal_lm(source, Paths(artifacts="/tmp/tailor-bench-kv"), dtype=torch.float32)
    model.eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median decode step")
    print(f"{'rows x context':>15} {'DynamicCache ms':>16} {'KVSlab ms':>10} {'speed-up':>9}")
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            rows, length = (int(n) for n in shape.split("x"))
            prefilled = DynamicCache()
            ids = torch.randint(
                100, 1000, (rows, length), generator=torch.Generator().manual_seed(0)
            )
            model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=prefilled,
                  use_cache=True, logits_to_keep=1)  # fmt: skip
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for slab in (False, True):
                    cache = DynamicCache()
                    for index, layer in enumerate(prefilled.layers):
                        cache.update(layer.keys.clone(), layer.values.clone(), index)
                    times[slab] += step_times(model, KVSlab(cache) if slab else cache, rows, length)
            concat, slab_ms = (statistics.median(times[s]) * 1000 for s in (False, True))
            print(f"{shape:>15} {concat:>16.1f} {slab_ms:>10.1f} {concat / slab_ms:>8.2f}x")


if __name__ == "__main__":
    main()
