"""Benchmark of enforced output formats (not a test): ``python tests/bench/bench_format.py``.

Prints, from one run on this machine, with the builtin SmolLM2-135M-Instruct engine:

1. Validity: N requests (default 100) asking for a person as JSON with a schema given in
   the system prompt, once free ("unconstrained": the prompt alone) and once with the
   schema as ``response_format`` (constrained decoding, xgrammar). Each answer is valid
   when it parses as JSON and validates against the schema; the free run also counts
   answers that hold a valid object somewhere in their text ("found inside").
2. Speed: completion tokens/s of both runs: the same prompts, seeds, sampling
   (temperature 0.7), ``max_tokens`` and batching (the engine's continuous batching,
   every request submitted at once), the timed span from the first submit to the last
   answer. The constrained run writes fewer tokens (no prose around the JSON), so
   tokens/s, not seconds, is what compares.
3. The mask's own cost per generated token (xgrammar's bitmask over the vocabulary),
   replayed over the constrained answers' tokens. (lm-format-enforcer, the other
   candidate, is not measured: its 0.11.3 release does not import with transformers 5.)

Options: ``--requests`` (100), ``--max-tokens`` (128), ``--batch`` (16).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jsonschema

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths
from tailor.workloads.serving.engine.base import Chunk, SamplingParams
from tailor.workloads.serving.engine.builtin import Engine, load_engine
from tailor.workloads.serving.engine.grammar import format_key

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "job": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}
JOBS = ["pilot", "baker", "nurse", "teacher", "farmer", "chemist", "judge", "sailor", "poet"]
CITIES = ["Lyon", "Osaka", "Lima", "Oslo", "Accra", "Perth", "Quebec", "Pune", "Graz", "Cusco"]
SYSTEM = (
    "You answer with one JSON object only, no other text, that satisfies this JSON Schema: "
    + json.dumps(SCHEMA)
)


def prompts(count: int) -> list[str]:
    return [
        f"Invent a {JOBS[i % len(JOBS)]} from {CITIES[(i // len(JOBS)) % len(CITIES)]}."
        for i in range(count)
    ]


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def found_inside(text: str) -> bool:
    """A valid object anywhere in the text (a lenient client's parse)."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except ValueError:
            continue
        try:
            jsonschema.validate(obj, SCHEMA)
            return True
        except jsonschema.ValidationError:
            continue
    return False


def run(engine: Engine, ids: list[list[int]], fmt: str | None, max_tokens: int) -> dict[str, Any]:
    sinks: list[queue.SimpleQueue[Chunk]] = []
    started = time.perf_counter()
    for i, prompt in enumerate(ids):
        sinks.append(queue.SimpleQueue())
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, response_format=fmt)
        engine.submit(prompt, None, params, sinks[-1].put)
    texts, tokens, reasons = [], 0, []
    for sink in sinks:
        parts = []
        while (chunk := sink.get(timeout=3600)).finish_reason is None:
            parts.append(chunk.text)
        parts.append(chunk.text)
        texts.append("".join(parts))
        tokens += chunk.completion_tokens
        reasons.append(chunk.finish_reason)
    seconds = time.perf_counter() - started
    return {
        "texts": texts,
        "valid": sum(map(valid, texts)) / len(texts),
        "inside": sum(map(found_inside, texts)) / len(texts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "length_cut": reasons.count("length"),
    }


def mask_costs(engine: Engine, texts: list[str]) -> dict[str, float]:
    """Seconds per generated token to compute the allowed-token bitmask (xgrammar)."""
    import xgrammar as xgr

    sequences = [engine.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    compiled = engine.grammars.compile(format_key("json_schema", SCHEMA) or "")
    vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    steps = 0
    started = time.perf_counter()
    for sequence in sequences:
        matcher = xgr.GrammarMatcher(compiled)
        for token in sequence:
            matcher.fill_next_token_bitmask(bitmask, 0)
            steps += 1
            if not matcher.accept_token(token):
                break
    return {"xgrammar": (time.perf_counter() - started) / max(steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    spec = ModelDeploymentSpec.model_validate(
        {
            "baseModel": {"builtin": "smollm2-135m-instruct"},
            "batching": {"maxBatchSize": args.batch, "maxQueue": max(256, args.requests)},
        }
    )
    engine = load_engine(spec, [], Paths(artifacts="/tmp/tailor-bench-format"))
    ids = [
        engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}])
        for p in prompts(args.requests)
    ]
    key = format_key("json_schema", SCHEMA)
    engine.check_format(key)  # compiled once, outside the timed span
    run(engine, ids[:4], None, 8)  # warm-up
    free = run(engine, ids, None, args.max_tokens)
    constrained = run(engine, ids, key, args.max_tokens)
    masks = mask_costs(engine, constrained["texts"])
    engine.close()

    print(f"\n{args.requests} requests, SmolLM2-135M-Instruct, temperature 0.7, "
          f"max_tokens {args.max_tokens}, batch {args.batch}")  # fmt: skip
    print("| run | valid JSON of the schema | found inside the text | cut at max_tokens "
          "| completion tokens | seconds | tokens/s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("unconstrained (prompt only)", free), ("constrained (xgrammar)", constrained)):
        print(f"| {name} | {100 * r['valid']:.0f}% | {100 * r['inside']:.0f}% | "
              f"{r['length_cut']} | {r['tokens']} | {r['seconds']:.1f} | "
              f"{r['tokens_per_second']:.1f} |")  # fmt: skip
    ratio = constrained["tokens_per_second"] / free["tokens_per_second"]
    print(f"\nconstrained / unconstrained tokens/s: {ratio:.3f} "
          f"(cost {100 * (1 - ratio):.1f}%; goal <= 15%)")  # fmt: skip
    for name, seconds in masks.items():
        print(f"mask per token, {name}: {1e6 * seconds:.0f} us")
    print(json.dumps({
        "valid_unconstrained": free["valid"],
        "valid_constrained": constrained["valid"],
        "tokens_per_second_unconstrained": round(free["tokens_per_second"], 2),
        "tokens_per_second_constrained": round(constrained["tokens_per_second"], 2),
        "mask_us_per_token": {k: round(1e6 * v, 1) for k, v in masks.items()},
    }))  # fmt: skip
    print("\nexample constrained answer:", constrained["texts"][0])
    print("example unconstrained answer:", free["texts"][0][:300])


if __name__ == "__main__":
    main()
