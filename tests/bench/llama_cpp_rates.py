"""llama.cpp's own loop: completion tokens/s of llama-cpp-python's ``Llama`` on a GGUF
file, for bench_serve.py (run in a child process: nothing of the engine under test is
loaded beside it).

Reads ``{"gguf", "prompts", "max_tokens", "threads", "runs": [[concurrency, count], ...]}``
as JSON on stdin, prints ``[[concurrency, tokens_per_second], ...]`` as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any


def throughput(prompts: list[str], concurrency: int, max_tokens: int, llm: Any) -> float:
    """Completion tokens/s of llama-cpp-python, ``concurrency`` threads sharing one model
    (llama-cpp-python serves one sequence at a time: a lock). Chat-formatted, greedy."""
    lock = threading.Lock()
    counts = [0] * concurrency

    def worker(index: int) -> None:
        for prompt in prompts[index::concurrency]:
            with lock:
                out = llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
            counts[index] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def rates(job: dict[str, Any]) -> list[tuple[int, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=job["gguf"], n_ctx=2048, n_threads=job["threads"], verbose=False)
    prompts = job["prompts"]
    throughput(prompts[:1], 1, 4, llm)  # warm-up
    return [
        (concurrency, throughput(prompts[:count], concurrency, job["max_tokens"], llm))
        for concurrency, count in job["runs"]
    ]


if __name__ == "__main__":
    print(json.dumps(rates(json.load(sys.stdin))))
