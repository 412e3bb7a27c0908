"""Serving under overload: 200 concurrent clients against a replica whose queue holds 32.

The replica (``python -m tailor.workloads.serving.app``, SmolLM2 on the builtin engine, or
the gateway before ``instant_upstream.py`` with ``--instant-upstream``) runs with
``batching: {maxBatchSize: 8, maxQueue: 32}``. First an unloaded run: 40 clients (what the
replica admits: 8 running + 32 waiting), each sending ``--requests`` requests one after
another. Then the overloaded run: 200 clients doing the same. It reports, for each: requests
admitted and refused (429), the p50 and p99 latency of admitted requests, the p50 and p99 of
the 429s, whether every 429 carried ``Retry-After``, and the replica's RSS before and after;
and checks the replica still answers ``/healthz``. Medians come with a 95% bootstrap
interval (the numbers are few).

    .venv/bin/python tests/bench/bench_overload.py [--clients 200] [--requests 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_gateway import free_port, serve_run, start_server, wait_ready  # noqa: E402

BATCH, QUEUE = 8, 32


def ci_median(values: list[float], rounds: int = 2000) -> tuple[float, float, float]:
    """Median with a 95% bootstrap interval."""
    if not values:
        return (float("nan"),) * 3
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return statistics.median(values), medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))] if values else float("nan")


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    admitted: list[float] = []
    refused: list[float] = []
    retry_after: list[bool] = []
    other: list[int] = []
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(index: int) -> None:
            for turn in range(requests):
                body = {
                    "model": "bench",
                    "messages": [{"role": "user", "content": f"Name a color ({index}.{turn})."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                started = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=body)
                took = time.perf_counter() - started
                if response.status_code == 200:
                    admitted.append(took)
                elif response.status_code == 429:
                    refused.append(took)
                    retry_after.append("retry-after" in response.headers)
                    await asyncio.sleep(0.2)  # a polite client backs off a little
                else:
                    other.append(response.status_code)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return {"admitted": admitted, "refused": refused, "retry_after": retry_after,
            "other": other, "wall": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3, help="per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--instant-upstream", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-overload-"))
    model = {"builtin": "smollm2-135m-instruct"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream = None
        if args.instant_upstream:
            port = free_port()
            script = ROOT / "tests" / "bench" / "instant_upstream.py"
            procs.append(subprocess.Popen([sys.executable, str(script), str(port), "16"]))
            wait_ready(f"http://127.0.0.1:{port}/v1/models", procs[-1], "instant upstream", 30)
            upstream = {"url": f"http://127.0.0.1:{port}", "model": "bench",
                        "maxInflight": BATCH + QUEUE}  # fmt: skip
        run = serve_run(free_port(), model, upstream)
        run["spec"]["batching"] = {"maxBatchSize": BATCH, "maxQueue": QUEUE}
        proc, url = start_server(run, work, "replica")
        procs.append(proc)
        replica = psutil.Process(proc.pid)
        asyncio.run(load(url, 4, 1, args.max_tokens))  # warm-up
        engine = "instant upstream behind the gateway" if upstream else "builtin engine, SmolLM2"
        print(f"replica: {engine}, maxBatchSize {BATCH}, maxQueue {QUEUE}; "
              f"{args.requests} requests per client, max_tokens {args.max_tokens}\n")  # fmt: skip
        print("| clients | admitted | 429 | other | admitted p50 s (95% CI) | admitted p99 s "
              "| 429 p50 ms | 429 p99 ms | Retry-After | RSS MiB before -> after |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        medians = {}
        for clients in (BATCH + QUEUE, args.clients):
            rss = replica.memory_info().rss / 2**20
            result = asyncio.run(load(url, clients, args.requests, args.max_tokens))
            after = replica.memory_info().rss / 2**20
            median, low, high = ci_median(result["admitted"])
            medians[clients] = median
            refused = result["refused"]
            print(
                f"| {clients} | {len(result['admitted'])} | {len(refused)} | "
                f"{len(result['other'])} | {median:.2f} ({low:.2f}-{high:.2f}) | "
                f"{p99(result['admitted']):.2f} | "
                f"{1000 * statistics.median(refused) if refused else float('nan'):.1f} | "
                f"{1000 * p99(refused):.1f} | "
                f"{'all' if all(result['retry_after']) else 'missing'} | {rss:.0f} -> {after:.0f} |"
            )
        assert proc.poll() is None, "the replica died"
        import httpx

        assert httpx.get(f"{url}/healthz", timeout=5).text == "ok"
        loaded, unloaded = medians[args.clients], medians[BATCH + QUEUE]
        print(f"\nadmitted p50 under overload vs unloaded: {100 * (loaded / unloaded - 1):+.1f}% "
              "(target: within 20%); the replica still answers /healthz")  # fmt: skip
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
