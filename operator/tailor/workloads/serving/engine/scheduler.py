"""What every in-process engine shares: the request queue, the scheduler thread, sampling and
the output of a sequence, so the builtin engine (torch) and the llama.cpp engine differ only
in how a step runs the model.

A :class:`BatchEngine` takes requests on any thread (``submit``; ``stream`` on an event
loop) into a bounded queue. Its scheduler thread runs control actions (adapter loads)
between two steps, admits waiting requests while the batch has room (:meth:`_admit`) and
advances the running batch one token (:meth:`_step`); a subclass implements those two with
its model. One sampler (temperature, top-p, a seed per request, presence and frequency
penalties, enforced formats through xgrammar's bitmask) and one output path (end of
sequence, stop sequences held back until they cannot match, max tokens, the context
window, incremental detokenization) serve both engines, so the same request gets the same
treatment from either.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers.decoders import DecodeStream

from tailor.observability.serving import ServingMetrics
from tailor.workloads.serving.engine.base import (
    Chunk,
    Completion,
    EngineClosed,
    QueueFull,
    SamplingParams,
    encode_chat,
    encode_text,
)
from tailor.workloads.serving.engine.grammar import Grammars, mask_logits

log = logging.getLogger("tailor.workloads.serving.engine.scheduler")

PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens admitted together in one step


@dataclass(eq=False)
class GenerationRequest:
    """A submitted request; ``sink`` receives its chunks on the scheduler thread."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Chunk], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    grammar: Any = None  # the compiled grammar of params.response_format

    def cancel(self) -> None:
        """Stop generating (the client went away); the last chunk says cancelled."""
        self.cancelled = True


@dataclass(eq=False)
class Row:
    """A request's sequence in the running batch (an engine adds what its model needs)."""

    request: GenerationRequest
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the generated tokens decoded so far (incrementally)
    decoder: Any = None  # tokenizers' DecodeStream of this row (None: decode in full)
    emitted: int = 0  # characters of the decoded text already sent
    device_seconds: float = 0.0
    finished: bool = False
    matcher: Any = None  # xgrammar's matcher of the request's format

    def start(self, device: torch.device | str = "cpu") -> None:
        """Set up sampling: a generator on the logits' device when the request samples
        (seeded by the request, else at random), a matcher when it has a format."""
        params = self.request.params
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        if self.request.grammar is not None:
            self.matcher = Grammars.matcher(self.request.grammar)


class BatchEngine:
    """Continuous batching around a model that a subclass runs; thread-safe ``submit``. A
    :class:`~tailor.workloads.serving.engine.base.TokenEngine` once the subclass adds
    :meth:`_admit`, :meth:`_step`, :meth:`_load_adapter` and :meth:`_unload_adapter`."""

    answers_whole = False
    """Chunks come one by one even when the client reads no stream (in-process, they cost
    nothing): the time to the first token is measured for every request."""

    adapters_in_place = True
    """Adapters load into the running engine (see :meth:`load_adapter`)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        logits_size: int,
        eos_ids: set[int],
        context_window: int,
        max_batch_size: int,
        max_queue: int,
        metrics: ServingMetrics | None,
        name: str,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # prompt token ids must be below it
        self.logits_size = logits_size  # the model's output width (the grammars' vocabulary)
        self.eos_ids = eos_ids
        self.context_window = context_window
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.adapters: dict[str, Any] = {}  # served name -> the engine's handle of it
        self._grammars: Grammars | None = None
        self._control: deque[Callable[[], None]] = deque()  # run on the engine's thread
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._closed = False
        self._rows: list[Any] = []  # the running batch (Row subclasses)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _start(self) -> None:
        """Start the scheduler (the subclass's last step of ``__init__``)."""
        self._thread.start()

    # ---------------------------------------------------------------- to implement
    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Start ``requests`` (prefill, or set up for the next step)."""
        raise NotImplementedError

    def _step(self) -> None:
        """Advance the running batch by one token per sequence."""
        raise NotImplementedError

    def _load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def _unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    def _between_steps(self) -> None:
        """Housekeeping after control actions (the builtin engine frees retired adapters)."""

    def _room(self) -> int:
        """How many more sequences may join the running batch now."""
        return self.max_batch_size - len(self._rows)

    def _reset(self) -> None:
        """Forget the running batch (after its requests were failed)."""
        self._rows = []

    # ---------------------------------------------------------------- public API
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation, with the model's chat template."""
        return encode_chat(self.tokenizer, messages)

    def encode_text(self, prompt: str) -> list[int]:
        """Prompt token ids of a plain completion prompt."""
        return encode_text(self.tokenizer, prompt)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at ``path`` as ``name`` from now on, without a restart.

        It loads on the engine's thread between two steps (the running batch pauses for
        the load, no request fails); a name already served is replaced (its running
        requests finish on the old weights, new ones get the new). WorkloadError when the
        adapter cannot be loaded; what was served stays served."""
        self._on_engine_thread(lambda: self._load_adapter(name, path))

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: new requests for it are refused at once, running ones
        finish, then its weights are freed. An unknown name is ignored."""
        self._on_engine_thread(lambda: self._unload_adapter(name))

    def _on_engine_thread(self, action: Callable[[], None]) -> None:
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

        def run() -> None:
            try:
                action()
            except BaseException as exc:  # handed to the caller's thread
                done.put(exc)
            else:
                done.put(None)

        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            self._control.append(run)
            self._cv.notify()
        error = done.get()
        if error is not None:
            raise error

    @property
    def grammars(self) -> Grammars:
        """The compiled response formats of this model's vocabulary (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.logits_size, sorted(self.eos_ids))
        return self._grammars

    def check_format(self, key: str | None) -> None:
        """Compile a response format now (cached); FormatError when it cannot be enforced."""
        if key is not None:
            self.grammars.compile(key)

    def submit(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        sink: Callable[[Chunk], None],
    ) -> GenerationRequest:
        """Queue a request; chunks go to ``sink`` (called on the engine's thread)."""
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter}")
        if not prompt_ids:
            raise ValueError("empty prompt")
        outside = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise ValueError(
                f"prompt token id {outside} is outside the vocabulary (0 to {self.vocab_size - 1})"
            )
        request = GenerationRequest(list(prompt_ids), adapter, params, sink)
        if params.response_format is not None:
            request.grammar = self.grammars.compile(params.response_format)
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._set_queue_depth()
            self._cv.notify()
        return request

    def full(self) -> bool:
        return len(self._waiting) >= self.max_queue  # a glance: submit checks again, locked

    async def stream(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        incremental: bool = True,
    ) -> AsyncGenerator[Chunk, None]:
        """The request's chunks as an async generator; closing it cancels the request.
        ``incremental`` is the gateway's hint that the client reads a stream; in-process
        chunks cost nothing, so they come one by one either way."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()

        def sink(chunk: Chunk) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        request = self.submit(prompt_ids, adapter, params, sink)
        try:
            while True:
                chunk = await chunks.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def generate(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Blocking generation (tests, benchmarks)."""
        chunks: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        request = self.submit(prompt_ids, adapter, params or SamplingParams(), chunks.put)
        parts = []
        try:
            while True:
                chunk = chunks.get(timeout=timeout)
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    if chunk.finish_reason == "error":
                        raise RuntimeError(chunk.error)
                    return Completion(
                        "".join(parts),
                        chunk.finish_reason,
                        chunk.completion_tokens,
                        chunk.device_seconds,
                    )
        finally:
            request.cancel()

    def drain(self, timeout: float) -> bool:
        """Wait until nothing waits or runs (True), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not self._waiting and not self._rows:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Stop the scheduler; waiting and running requests end with an error chunk."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    async def aclose(self) -> None:
        """:meth:`close` from an event loop (in a thread: it waits for the scheduler)."""
        await asyncio.to_thread(self.close)

    # ---------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while (
                        not self._waiting
                        and not self._rows
                        and not self._control
                        and not self._closed
                    ):
                        self._cv.wait()
                    if self._closed:
                        break
                    control, self._control = list(self._control), deque()
                    admitted = self._take_waiting()
                for action in control:  # adapter loads and unloads, between two steps
                    action()
                self._between_steps()
                if admitted:
                    self._admit(admitted)
                try:
                    if self._rows:
                        self._step()
                except Exception:  # a failed step must not kill the server
                    log.exception("a decode step failed; failing the running batch")
                    self._fail([row.request for row in self._rows], "generation failed")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        self._fail(waiting + [row.request for row in self._rows], "the engine was shut down")

    def _take_waiting(self) -> list[GenerationRequest]:
        """Waiting requests that fit in the batch and the prefill budget (FIFO)."""
        taken: list[GenerationRequest] = []
        longest = 0
        room = self._room()
        while self._waiting and len(taken) < room:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                deliver(request, Chunk("", "cancelled"))
                continue
            longest_after = max(longest, len(request.prompt_ids))
            if taken and longest_after * (len(taken) + 1) > PREFILL_TOKEN_BUDGET:
                break
            taken.append(self._waiting.popleft())
            longest = longest_after
        self._set_queue_depth()
        return taken

    def _requeue(self, requests: Sequence[GenerationRequest]) -> None:
        """Put admitted requests back at the head of the queue (no room for them yet)."""
        with self._cv:
            self._waiting.extendleft(reversed(requests))
            self._set_queue_depth()

    # ---------------------------------------------------------------- sampling and output
    def _sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """One token per row: greedy at temperature 0, else temperature + top-p sampling
        with the row's own generator (so a seed reproduces whatever else is batched). Rows
        with a response format sample only among the tokens their grammar allows."""
        mask_logits(logits, [(i, row.matcher) for i, row in enumerate(rows) if row.matcher])
        for i, row in enumerate(rows):
            p = row.request.params
            if (p.presence_penalty or p.frequency_penalty) and row.generated:
                counts = torch.bincount(
                    torch.tensor(row.generated, device=logits.device), minlength=logits.shape[1]
                ).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if row.generator is not None]
        if not sampled:
            return tokens
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor(
            [rows[i].request.params.temperature for i in sampled], device=logits.device
        )
        top_p = torch.tensor([rows[i].request.params.top_p for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        for j, i in enumerate(sampled):
            choice = torch.multinomial(sorted_probs[j], 1, generator=rows[i].generator)
            tokens[i] = int(sorted_ids[j, choice].item())
        return tokens

    def _advance(self, row: Row, token: int, prompt_length: int) -> bool:
        """Add a sampled token to a row, send what text is final; True when it finished."""
        request, params = row.request, row.request.params
        reason = None
        if request.cancelled:
            reason = "cancelled"
        elif token in self.eos_ids:
            reason = "stop"
        else:
            row.generated.append(token)
            if row.matcher is not None and (
                not row.matcher.accept_token(token) or row.matcher.is_terminated()
            ):
                reason = "stop"  # the format is complete (or, never expected, broken)
        if token not in self.eos_ids and not request.cancelled:
            row.text = self._decoded(row, token)
        text = row.text
        if reason is None and params.stop:
            found = [
                i
                for i in (text.find(s, max(0, row.emitted - len(s))) for s in params.stop)
                if i >= 0
            ]
            if found:
                text, reason = text[: min(found)], "stop"
        total = prompt_length + len(row.generated)
        if reason is None and (
            len(row.generated) >= params.max_tokens or total >= self.context_window
        ):
            reason = "length"
        if reason is not None:
            row.finished = True
            deliver(
                request,
                Chunk(text[row.emitted :], reason, len(row.generated), row.device_seconds),
            )
            return True
        # Hold back what could still become a stop sequence or is half a character.
        final = len(text) - max((len(s) - 1 for s in params.stop), default=0)
        if text.endswith("\ufffd"):
            final = min(final, len(text.rstrip("\ufffd")))
        if final > row.emitted:
            deliver(request, Chunk(text[row.emitted : final]))
            row.emitted = final
        return False

    def _decoded(self, row: Row, token: int) -> str:
        """The row's text with ``token`` (already in ``row.generated``) added: one step of
        its DecodeStream (held back until a character is complete), not a decode of the
        whole sequence per token (quadratic in the answer's length)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: decode in full
            return str(self.tokenizer.decode(row.generated, skip_special_tokens=True))
        if row.decoder is None:
            row.decoder = DecodeStream(skip_special_tokens=True)
        piece = row.decoder.step(backend, token)
        return row.text + piece if piece else row.text

    def _fail(self, requests: Sequence[GenerationRequest], message: str) -> None:
        """End ``requests`` with an error chunk and empty the running batch."""
        for request in dict.fromkeys(requests):
            deliver(request, Chunk("", "error", error=message))
        self._reset()

    def _observe(self, size: int, tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(size, tokens)

    def _observe_prefix(self, reused: int, computed: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_prefix(reused, computed)

    def _set_queue_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self._waiting))


def deliver(request: GenerationRequest, chunk: Chunk) -> None:
    try:
        request.sink(chunk)
    except Exception:  # a client's closed event loop must not stop the engine
        log.debug("dropping a chunk for a request whose consumer is gone", exc_info=True)


def eos_ids(tokenizer: Any, configured: int | Sequence[int] | None = None) -> set[int]:
    """The token ids that end a sequence: the model's configured ones, the tokenizer's, and
    ``<|endoftext|>`` when it is a special token."""
    ids: set[int] = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end_of_text, int) and end_of_text in tokenizer.all_special_ids:
        ids.add(end_of_text)
    return ids
