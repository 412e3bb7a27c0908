"""The chat client's retry policy against a real HTTP server on 127.0.0.1: what is retried
(dropped connections, 408, 429, 5xx), what is not (other 4xx), how often, how long it
waits, and what its callers (the prompt tests, the RAFT teacher) make of a failure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tailor.api.workloads import PromptTestRun
from tailor.workloads.errors import WorkloadError
from tailor.workloads.evaluation.chat import ChatClient, ChatError
from tailor.workloads.evaluation.prompt_tests import run_cases
from tailor.workloads.raft.data import Teacher

DROP = "drop"
"""A scripted answer: close the connection without a response."""


def completion(text: str) -> tuple[int, Any]:
    return 200, {
        "choices": [{"message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }


@dataclass
class Endpoint:
    """A scripted OpenAI-compatible server: each request takes the next answer (``DROP``
    or ``(status, body)``); with the script empty it answers ``completion("ok")``."""

    url: str
    script: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    state = Endpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": body,
                }
            )
            answer = state.script.pop(0) if state.script else completion("ok")
            if answer == DROP:
                self.close_connection = True
                return
            status, payload = answer
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = handle_one

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1/"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_chat_sends_the_request_and_returns_the_text(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key as a bearer token, params as the body's fields, no proxy from the environment."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    endpoint.script = [completion("Paris"), completion("x"), (200, {"data": [{"id": "md"}]})]
    messages = [{"role": "user", "content": "Capital of France?"}]
    with ChatClient(endpoint.url, api_key="k3y") as client:
        assert client.chat(messages, model="md", temperature=0, max_tokens=8) == "Paris"
        assert client.complete(messages, model="md")["usage"]["completion_tokens"] == 1
        assert client.models() == ["md"]
    assert client.http.is_closed
    first = endpoint.requests[0]
    assert (first["method"], first["path"]) == ("POST", "/v1/chat/completions")
    assert first["headers"]["Authorization"] == "Bearer k3y"
    assert first["body"] == {"messages": messages, "model": "md", "temperature": 0, "max_tokens": 8}
    assert endpoint.requests[2]["path"] == "/v1/models"


def test_dropped_connections_and_retryable_statuses_are_retried_with_doubling_waits(
    endpoint: Endpoint,
) -> None:
    endpoint.script = [DROP, (503, "busy"), (429, "slow down"), completion("at last")]
    client = ChatClient(endpoint.url, attempts=4, backoff=0.05)
    started = time.monotonic()
    assert client.chat([{"role": "user", "content": "hi"}], model="m") == "at last"
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # waits 0.05, 0.1, 0.2 s
    assert len(endpoint.requests) == 4
    client.close()


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retries_are_bounded_and_the_error_is_the_last_one(endpoint: Endpoint, status: int) -> None:
    endpoint.script = [(status, "x" * 1000)] * 5
    client = ChatClient(endpoint.url, attempts=3, backoff=0.0)
    with pytest.raises(ChatError) as error:
        client.chat([{"role": "user", "content": "hi"}], model="m")
    assert len(endpoint.requests) == 3  # attempts, the first included
    assert str(error.value) == f"HTTP {status}: " + "x" * 300  # the body's first 300 chars
    assert (error.value.refused, error.value.status) == (False, status)
    client.close()


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_refusal_is_not_retried(endpoint: Endpoint, status: int) -> None:
    endpoint.script = [(status, '{"error": "no such model"}')]
    client = ChatClient(endpoint.url, backoff=10.0)  # a retry would wait 10 s
    with pytest.raises(ChatError) as error:
        client.chat([{"role": "user", "content": "hi"}], model="nope")
    assert len(endpoint.requests) == 1
    assert str(error.value) == f'HTTP {status}: {{"error": "no such model"}}'
    assert (error.value.refused, error.value.status) == (True, status)
    client.close()


def test_a_connection_dropped_on_every_attempt_is_the_error(endpoint: Endpoint) -> None:
    endpoint.script = [DROP] * 2
    client = ChatClient(endpoint.url, attempts=2, backoff=0.0)
    with pytest.raises(ChatError) as error:
        client.chat([{"role": "user", "content": "hi"}], model="m")
    assert str(error.value).startswith("RemoteProtocolError: ")
    assert (error.value.refused, error.value.status, len(endpoint.requests)) == (False, None, 2)
    client.close()


def test_the_teacher_names_a_refusal_and_an_endpoint_that_never_answers(
    endpoint: Endpoint,
) -> None:
    teacher = Teacher(endpoint.url, "m", None)
    teacher.endpoint.backoff = 0.0
    endpoint.script = [(400, "bad request")]
    with pytest.raises(WorkloadError) as error:
        teacher.chat([{"role": "user", "content": "hi"}])
    assert error.value.reason == "TeacherFailed"
    assert error.value.message == "the teacher refused a request: HTTP 400: bad request"
    endpoint.script = [(502, "bad gateway")] * 4
    with pytest.raises(WorkloadError) as error:
        teacher.chat([{"role": "user", "content": "hi"}])
    assert error.value.reason == "TeacherUnavailable"
    assert error.value.message == "the teacher did not answer: HTTP 502: bad gateway"
    assert len(endpoint.requests) == 1 + 4
    endpoint.script = [(200, {"data": []})]
    with pytest.raises(WorkloadError, match="lists no models"):
        Teacher(endpoint.url, None, None)
    teacher.close()


def test_prompt_tests_ask_through_the_revision_and_report_a_failed_request(
    endpoint: Endpoint, tmp_path: Any
) -> None:
    run = PromptTestRun.model_validate(
        {
            "owner": {"kind": "PromptProfile", "namespace": "ns", "name": "pp"},
            "paths": {"artifacts": str(tmp_path)},
            "revision": 2,
            "casesHash": "h",
            "target": {"baseUrl": endpoint.url, "model": "md"},
            "spec": {
                "system": "Answer in one word.",
                "tests": {
                    "deploymentRef": {"name": "md"},
                    "cases": [
                        {
                            "name": "equal",
                            "input": {"question": "Capital?", "country": "France"},
                            "expect": {"equals": "Paris"},
                        },
                        {
                            "name": "case",
                            "input": {"question": "Capital?"},
                            "expect": {"contains": "paris"},
                        },
                        {
                            "name": "refused",
                            "input": {"question": "?"},
                            "expect": {"contains": "x"},
                        },
                    ],
                },
            },
        }
    )
    endpoint.script = [completion(" Paris\n"), completion("Paris"), (404, "no model md")]
    cases = run_cases(run)["tests"]["cases"]
    assert [(c["name"], c["passed"], c["message"]) for c in cases] == [
        ("equal", True, ""),
        ("case", False, "does not contain 'paris'"),
        ("refused", False, "request failed: HTTP 404: no model md"),
    ]
    body = endpoint.requests[0]["body"]
    assert body["model"] == "md" and body["messages"] == [{"role": "user", "content": "Capital?"}]
    assert body["tailor"]["variables"] == {"country": "France"}
    assert body["tailor"]["promptProfile"]["system"] == "Answer in one word."
