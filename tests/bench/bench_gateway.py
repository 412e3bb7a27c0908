"""Gateway overhead: completion tokens/s of a token engine alone, and through Tailor's
gateway in front of it (``spec.engine: vllm`` puts the gateway before vLLM the same way).

Both are hit by the same client code with the same APIBench prompts, greedy, the same
``max_tokens`` and concurrency; rounds alternate (alone, gateway, alone, gateway) and the
table shows the mean of each. The gateway runs with its response cache off, so every
request reaches the engine.

Without ``--upstream-url`` the engine is Tailor's builtin engine run as its own OpenAI
server process (SmolLM2, this machine's CPU). On a GPU machine, start vLLM and pass
``--upstream-url http://127.0.0.1:8001 --model NAME`` (``tests/gpu/serve.sh`` does).
``--instant-upstream`` puts ``instant_upstream.py`` (answers at once, ``--max-tokens``
tokens) behind the gateway: the gateway's own cost, with no engine time to hide it.

    .venv/bin/python tests/bench/bench_gateway.py [--concurrency 1,16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_serve import questions, server_throughput  # noqa: E402

SERVED = "bench"  # bench_serve's clients ask for this model name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(run: dict[str, Any], work: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m tailor.workloads.serving.app`` on ``run`` (a ServeRun), once ready."""
    spec = work / f"{name}.json"
    spec.write_text(json.dumps(run))
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailor.workloads.serving.app", "--spec", str(spec)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{run['port']}"
    wait_ready(f"{url}/readyz", proc, name, 1800, work / f"{name}.log")
    return proc, url


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], name: str, seconds: float, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; stop if ``proc`` exits (with its log's tail)."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise SystemExit(f"{name} exited: {tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not become ready")
        time.sleep(0.2)


def serve_run(port: int, model: dict[str, Any], upstream: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "spec": {
            "baseModel": model,
            "cache": {"enabled": False},
            "batching": {"maxBatchSize": 64, "maxQueue": 1024},
        },
        "servedName": SERVED,
        "owner": {"kind": "ModelDeployment", "namespace": "bench", "name": SERVED},
        "paths": {"artifacts": "/tmp/tailor-bench", "pvcs": "/"},
        "host": "127.0.0.1",
        "port": port,
        **({"upstream": upstream} if upstream else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32, help="requests per level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream-url", help="an engine already serving (e.g. vLLM)")
    parser.add_argument("--model", default=SERVED, help="the upstream's model name")
    parser.add_argument(
        "--instant-upstream",
        action="store_true",
        help="an upstream that answers at once (the gateway's own cost)",
    )
    parser.add_argument(
        "--model-dir",
        help="the upstream's model folder, for the gateway's tokenizer (default: the builtin "
        "SmolLM2)",
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    model: dict[str, Any] = {"builtin": "smollm2-135m-instruct"}
    if args.model_dir:  # a local folder, as a path on a "claim" mounted at /
        parts = Path(args.model_dir).resolve().parts
        model = {"pvc": {"claimName": parts[1], "path": "/".join(parts[2:])}}
    work = Path(tempfile.mkdtemp(prefix="tailor-bench-gateway-"))
    procs = []
    try:
        if args.upstream_url:
            engine_url = args.upstream_url
        elif args.instant_upstream:
            port = free_port()
            script = ROOT / "tests" / "bench" / "instant_upstream.py"
            cmd = [sys.executable, str(script), str(port), str(args.max_tokens)]
            procs.append(subprocess.Popen(cmd))
            engine_url = f"http://127.0.0.1:{port}"
            wait_ready(f"{engine_url}/v1/models", procs[-1], "instant upstream", 30)
        else:
            proc, engine_url = start_server(serve_run(free_port(), model, None), work, "engine")
            procs.append(proc)
        upstream = {"url": engine_url, "model": args.model}
        proc, gateway_url = start_server(serve_run(free_port(), model, upstream), work, "gateway")
        procs.append(proc)
        prompts = questions(args.prompts)
        server_throughput(engine_url, prompts[:4], 4, 8)  # warm-up both paths
        server_throughput(gateway_url, prompts[:4], 4, 8)
        kind = "given" if args.upstream_url else "instant" if args.instant_upstream else "builtin"
        print(f"engine: {engine_url} ({kind}, own process)")
        print(f"{len(prompts)} requests per level, max_tokens {args.max_tokens}, greedy\n")
        print(
            "| concurrency | engine alone tok/s | through the gateway tok/s | overhead "
            "| gateway CPU ms/request |"
        )
        print("|---:|---:|---:|---:|---:|")
        gateway = psutil.Process(proc.pid)
        for level in levels:
            alone, through, cpu = [], [], 0.0
            for _ in range(args.rounds):
                alone.append(server_throughput(engine_url, prompts, level, args.max_tokens))
                before = sum(gateway.cpu_times()[:2])
                through.append(server_throughput(gateway_url, prompts, level, args.max_tokens))
                cpu += sum(gateway.cpu_times()[:2]) - before
            a, g = statistics.mean(alone), statistics.mean(through)
            per_request = 1000 * cpu / (args.rounds * len(prompts))
            print(
                f"| {level} | {a:.1f} | {g:.1f} | {100 * (a - g) / a:+.1f}% | {per_request:.2f} |"
            )
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
