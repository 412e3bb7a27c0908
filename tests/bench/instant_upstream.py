"""An OpenAI-style upstream that answers at once: a measuring instrument for the gateway's
own cost (``bench_gateway.py --instant-upstream``), the way one puts a static backend behind
a proxy to measure the proxy. Not used by any test.

It lists one model (``bench``) and answers every completion or chat request with ``N``
tokens of " tok": streamed (one event per token, then usage and ``[DONE]``) or whole.

    .venv/bin/python tests/bench/instant_upstream.py PORT [N]
"""

from __future__ import annotations

import asyncio
import json
import sys


def _http(payload: bytes, content_type: str) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(payload)}"
    return head.encode() + b"\r\n\r\n" + payload


def answer(head: bytes, body: dict[str, object], tokens: int) -> bytes:
    if head.startswith(b"GET /v1/models"):
        models = {"object": "list", "data": [{"id": "bench", "object": "model"}]}
        return _http(json.dumps(models).encode(), "application/json")
    if body.get("stream"):
        events = []
        for i in range(tokens):
            finish = None if i < tokens - 1 else "length"
            choice = {"index": 0, "text": " tok", "finish_reason": finish}
            events.append(json.dumps({"id": "x", "object": "text_completion", "choices": [choice]}))
        usage = {"prompt_tokens": 10, "completion_tokens": tokens}
        events.append(json.dumps({"id": "x", "choices": [], "usage": usage}))
        events.append("[DONE]")
        return _http("".join(f"data: {e}\n\n" for e in events).encode(), "text/event-stream")
    text = " tok" * tokens
    whole = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "text": text,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10},
    }
    return _http(json.dumps(whole).encode(), "application/json")


async def serve(port: int, tokens: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on the connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                writer.write(answer(head, body, tokens))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64))
