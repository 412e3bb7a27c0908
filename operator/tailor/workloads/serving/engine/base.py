"""What the gateway knows of a token engine: the :class:`TokenEngine` protocol that the builtin
scheduler (:mod:`~tailor.workloads.serving.engine.builtin`) and an upstream server such as
vLLM (:mod:`~tailor.workloads.serving.engine.upstream`) both implement, and the types they
share: sampling parameters, output chunks, the errors a request can meet, and the prompt
encoding both apply (the model's chat template), so a conversation becomes the same token
ids with either engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tailor.observability.serving import ServingMetrics


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: str | None = None
    """A :func:`tailor.workloads.serving.engine.grammar.format_key`: answers constrained to JSON or a JSON
    schema by constrained decoding; None: free text."""


@dataclass(frozen=True)
class Chunk:
    """A piece of a request's output, delivered in order; the last one has finish_reason
    (stop, length, cancelled or error) and the totals."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    device_seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Completion:
    """The whole output of a request (the builtin engine's blocking
    :meth:`~tailor.workloads.serving.engine.builtin.Engine.generate`)."""

    text: str
    finish_reason: str
    completion_tokens: int
    device_seconds: float


class QueueFull(Exception):
    """More requests are waiting than ``batching.maxQueue`` allows."""


class EngineClosed(Exception):
    """The engine was shut down."""


class EngineUnavailable(Exception):
    """The engine cannot be reached (an upstream engine server that is down)."""


class EngineRejected(Exception):
    """The engine refused the request as invalid (an upstream 4xx); ``status`` and the
    engine's message are passed on to the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids of a conversation, with the model's chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_text(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids of a plain completion prompt."""
    return list(tokenizer(prompt).input_ids)


class TokenEngine(Protocol):
    """A token engine as the gateway uses it: prompts go in as token ids, chunks of text come
    out. Everything the gateway asks of an engine is here (no casts, no ``hasattr``)."""

    @property
    def metrics(self) -> ServingMetrics | None:
        """The metrics the engine records into (the gateway's own when it has none)."""
        ...

    @property
    def context_window(self) -> int:
        """Tokens of prompt plus completion the model takes."""
        ...

    @property
    def adapter_names(self) -> list[str]:
        """The adapters served now (they change without a restart)."""
        ...

    @property
    def adapters_in_place(self) -> bool:
        """Whether :meth:`load_adapter` works on this engine; False: a change of adapters
        needs a new engine (dynamic int8 layers take no LoRA once quantized)."""
        ...

    @property
    def answers_whole(self) -> bool:
        """Whether a non-incremental :meth:`stream` yields the whole answer as one chunk
        (then the time to the first token is not measured for it)."""
        ...

    def full(self) -> bool:
        """Whether a request submitted now would be refused (QueueFull): the gateway asks
        before any work on a request, so that overload is answered 429 at once."""
        ...

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation, with the model's chat template."""
        ...

    def encode_text(self, prompt: str) -> list[int]:
        """Prompt token ids of a plain completion prompt."""
        ...

    def check_format(self, key: str | None) -> None:
        """FormatError when a response format cannot be enforced by this engine."""
        ...

    def stream(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        incremental: bool = True,
    ) -> AsyncGenerator[Chunk, None]:
        """The request's chunks; the last has a finish_reason. Closing the generator cancels
        the request. The first ``anext`` submits it: QueueFull, EngineClosed,
        EngineUnavailable, EngineRejected or ValueError (a prompt refused) surface there."""
        ...

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at ``path`` as ``name`` (replacing one of that name);
        WorkloadError when it cannot be loaded."""
        ...

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` (an unknown name is ignored)."""
        ...

    def drain(self, timeout: float) -> bool:
        """Wait until no request of this engine runs (True), at most ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Stop the engine (any thread); requests still running end with an error chunk."""
        ...

    async def aclose(self) -> None:
        """Close the engine from the server's event loop at shutdown (what belongs to the
        loop, such as HTTP sessions, then :meth:`close`)."""
        ...
