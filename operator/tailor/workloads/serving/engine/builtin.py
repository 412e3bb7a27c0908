"""The generation engine of the serving workload: one base model plus any number of LoRA
adapters, with continuous batching of concurrent requests.

A scheduler thread owns the model. Between two decode steps it admits waiting requests (up
to ``batching.maxBatchSize`` sequences in flight): their prompts are prefilled together,
left-padded, and their key/value caches are written into the running batch's preallocated
cache (:class:`~tailor.workloads.serving.engine.kvcache.KVSlab`: no copy of the running rows), so a new
request never waits for the others to finish. Each decode step feeds one token per
sequence through the model and writes its KV in place; finished sequences leave the batch
at once. Requests for different adapters share a batch: PEFT's mixed-adapter inference
(``adapter_names=[...]``, ``"__base__"`` for the base model with adapters disabled) applies
each row's own LoRA weights. Sampling (temperature, top-p, seed, penalties) and stop
sequences are per request. transformers' own ``generate`` batches only requests that
arrive together and share parameters and adapter, which is why the loop is written here.

The engine is a :class:`~tailor.workloads.serving.engine.base.TokenEngine`; its model is
loaded (and quantized) by :mod:`~tailor.workloads.serving.engine.loading`.
"""

from __future__ import annotations

import asyncio
import itertools
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
from transformers import DynamicCache

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths, ServedAdapter
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import WorkloadError
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
from tailor.workloads.serving.engine.kvcache import PREFIX_CACHE_TOKENS, KVSlab, Prefix, PrefixCache
from tailor.workloads.serving.engine.loading import attach_adapter, load_model

log = logging.getLogger("tailor.workloads.serving.engine.builtin")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens prefilled together in one forward pass


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
class _Row:
    """A request's sequence in the running batch."""

    request: GenerationRequest
    peft_name: str
    generator: torch.Generator | None
    position: int  # position id of the next token fed to the model
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the generated tokens decoded so far (incrementally)
    decoder: Any = None  # tokenizers' DecodeStream of this row (None: decode in full)
    emitted: int = 0  # characters of the decoded text already sent
    device_seconds: float = 0.0
    finished: bool = False
    matcher: Any = None  # xgrammar's matcher of the request's format


class Engine:
    """Continuous-batching generation over a (PEFT) causal LM; thread-safe ``submit``. A
    :class:`~tailor.workloads.serving.engine.base.TokenEngine`."""

    answers_whole = False
    """Chunks come one by one even when the client reads no stream (in-process, they cost
    nothing): the time to the first token is measured for every request."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapters: dict[str, str] | None = None,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        context_window: int | None = None,
        metrics: ServingMetrics | None = None,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = dict(adapters or {})  # served adapter name -> PEFT adapter name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_window = context_window or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self._peft = bool(self.adapters)
        self._grammars: Grammars | None = None
        # a sliding-window cache keeps only its window: a stored prefix would not fit it
        windowed = getattr(model.config, "sliding_window", None) is not None
        self._prefixes = (
            PrefixCache(prefix_cache_tokens) if prefix_cache_tokens and not windowed else None
        )
        self._adapter_ids = itertools.count(len(self.adapters))
        self._retired: set[str] = set()  # PEFT adapters unloaded once no running row uses them
        self._control: deque[Callable[[], None]] = deque()  # run on the engine's thread
        self.adapters_in_place = True
        """Adapters load into the running model (not after dynamic int8: see load_engine)."""

        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._closed = False
        # Running batch: one row per sequence, aligned with the cache's batch dimension.
        self._rows: list[_Row] = []
        self._cache: KVSlab | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._next = torch.zeros((0,), dtype=torch.long, device=self.device)
        self._thread = threading.Thread(target=self._loop, name="tailor-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation, with the model's chat template."""
        return encode_chat(self.tokenizer, messages)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at ``path`` as ``name`` from now on, without a restart.

        It loads on the engine's thread between two steps (the running batch pauses for
        the load, no request fails); a name already served is replaced (its running
        requests finish on the old weights, new ones get the new). WorkloadError when the
        adapter cannot be loaded; what was served stays served."""
        if not self.adapters_in_place:
            raise WorkloadError(
                "AdapterLoadFailed",
                f"adapter {name}: this model's dynamic int8 layers take no LoRA once "
                "quantized; the server loads a new engine with it instead",
            )
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

    def _load_adapter(self, name: str, path: str) -> None:
        peft_name = f"adapter_{next(self._adapter_ids)}"
        log.info("loading adapter %s from %s", name, path)
        started = time.perf_counter()
        try:
            self.model = attach_adapter(self.model, path, peft_name)
        except Exception as exc:
            raise WorkloadError("AdapterLoadFailed", f"adapter {name} at {path}: {exc}") from exc
        self.model.eval()
        self._peft = True
        old = self.adapters.get(name)
        self.adapters = {**self.adapters, name: peft_name}  # one assignment: submit reads it
        if old is not None:
            self._retired.add(old)
        log.info("adapter %s loaded in %.2f s", name, time.perf_counter() - started)

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            return
        adapters = dict(self.adapters)
        self._retired.add(adapters.pop(name))
        self.adapters = adapters
        log.info("adapter %s unloaded", name)

    def _free_retired(self) -> None:
        """Delete the weights of retired adapters no running row still uses."""
        in_use = {row.peft_name for row in self._rows}
        for peft_name in sorted(self._retired - in_use):
            self._retired.discard(peft_name)
            remaining = [n for n in self.model.peft_config if n != peft_name]
            if not remaining:  # a PeftModel keeps one adapter: it stays, unused (rows
                self._retired.add(peft_name)  # without one run as __base__), until the
                return  # next load
            if self.model.active_adapter == peft_name:
                self.model.set_adapter(remaining[0])
            self.model.delete_adapter(peft_name)

    @property
    def grammars(self) -> Grammars:
        """The compiled response formats of this model's vocabulary (built on first use)."""
        if self._grammars is None:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self._grammars = Grammars(self.tokenizer, vocab, sorted(self.eos_ids))
        return self._grammars

    def check_format(self, key: str | None) -> None:
        """Compile a response format now (cached); FormatError when it cannot be enforced."""
        if key is not None:
            self.grammars.compile(key)

    def encode_text(self, prompt: str) -> list[int]:
        """Prompt token ids of a plain completion prompt."""
        return encode_text(self.tokenizer, prompt)

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
                if self._retired:
                    self._free_retired()
                if admitted:
                    self._prefill_isolated(admitted)
                try:
                    if self._rows:
                        self._decode()
                except Exception:  # a failed decode step must not kill the server
                    log.exception("a decode step failed; failing the running batch")
                    self._fail([row.request for row in self._rows], "generation failed")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        self._fail(waiting + [row.request for row in self._rows], "the engine was shut down")

    def _take_waiting(self) -> list[GenerationRequest]:
        """Waiting requests that fit in the batch and the prefill budget (FIFO)."""
        taken: list[GenerationRequest] = []
        longest = 0
        while self._waiting and len(self._rows) + len(taken) < self.max_batch_size:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                _deliver(request, Chunk("", "cancelled"))
                continue
            longest_after = max(longest, len(request.prompt_ids))
            if taken and longest_after * (len(taken) + 1) > PREFILL_TOKEN_BUDGET:
                break
            taken.append(self._waiting.popleft())
            longest = longest_after
        self._set_queue_depth()
        return taken

    def _prefill_isolated(self, requests: list[GenerationRequest]) -> None:
        """Prefill new requests together; when that fails, each alone, so a request that
        breaks the forward pass (or its sampling) fails by itself and neither the others
        admitted with it nor the running batch (untouched until a prefill succeeds) lose
        their answers. A request whose prompt starts with a cached prefix is prefilled
        alone from it (only the rest of its prompt is computed)."""
        plain = []
        for request in requests:
            hit = self._prefix_hit(request)
            if hit is None:
                plain.append(request)
                continue
            try:
                self._prefill_from(request, *hit)
            except Exception:
                log.exception("a request failed in prefill; failing it alone")
                _deliver(request, Chunk("", "error", error="generation failed"))
        if plain:
            self._prefill_plain(plain)

    def _prefill_plain(self, requests: list[GenerationRequest]) -> None:
        try:
            self._prefill(requests)
            return
        except Exception:
            if len(requests) == 1:
                log.exception("a request failed in prefill; failing it alone")
                _deliver(requests[0], Chunk("", "error", error="generation failed"))
                return
            log.warning("a prefill of %d requests failed; retrying each alone", len(requests))
        for request in requests:
            self._prefill_plain([request])

    def _prefix_hit(self, request: GenerationRequest) -> tuple[Prefix, int] | None:
        if self._prefixes is None:
            return None
        peft_name = self.adapters.get(request.adapter, BASE) if request.adapter else BASE
        return self._prefixes.longest(peft_name, request.prompt_ids)

    def _remember(self, row: _Row, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a prefilled prompt's KV for later prompts that start the same way."""
        if self._prefixes is not None:
            self._prefixes.put(row.peft_name, row.request.prompt_ids, layers)

    def _prefill_from(self, request: GenerationRequest, prefix: Prefix, shared: int) -> None:
        """Prefill one request whose first ``shared`` prompt tokens are ``prefix``'s: its
        KV is the cache's (not copied: every later step makes new tensors), only the rest
        of the prompt runs through the model."""
        row = self._new_row(request)
        cache = DynamicCache()
        for index, (keys, values) in enumerate(prefix.layers):
            cache.update(keys[:, :, :shared], values[:, :, :shared], index)
        rest = request.prompt_ids[shared:]
        ids = torch.tensor([rest], device=self.device)
        mask = torch.ones((1, len(request.prompt_ids)), dtype=torch.long, device=self.device)
        positions = torch.arange(shared, len(request.prompt_ids), device=self.device)[None]
        started = time.perf_counter()
        logits = self._forward(ids, mask, positions, cache, [row])
        token = self._sample(logits, [row])[0]
        row.device_seconds += time.perf_counter() - started
        self._observe(1, 1)
        self._observe_prefix(shared, len(rest))
        layers: list[Any] = cache.layers
        self._remember(row, [(layer.keys, layer.values) for layer in layers])
        if not self._advance(row, token):
            self._join(cache, mask, [row], torch.tensor([token], device=self.device))

    def _observe_prefix(self, reused: int, computed: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_prefix(reused, computed)

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Run the new prompts together, sample their first tokens, join the batch."""
        length = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), length), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, length - len(request.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [self._new_row(r) for r in requests]
        cache = DynamicCache()

        started = time.perf_counter()
        logits = self._forward(ids, mask, positions, cache, rows)
        tokens = self._sample(logits, rows)
        elapsed = time.perf_counter() - started

        total = sum(len(r.prompt_ids) for r in requests)
        for row in rows:
            row.device_seconds += elapsed * len(row.request.prompt_ids) / total
        self._observe(len(rows), len(rows))
        self._observe_prefix(0, total)
        if self._prefixes is not None:
            layers: list[Any] = cache.layers
            for i, row in enumerate(rows):
                start = length - len(row.request.prompt_ids)  # after the left padding
                self._remember(row, [
                    (layer.keys[i : i + 1, :, start:].clone(),
                     layer.values[i : i + 1, :, start:].clone())
                    for layer in layers
                ])  # fmt: skip
        keep = [i for i, row in enumerate(rows) if not self._advance(row, tokens[i])]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        next_tokens = torch.tensor([tokens[i] for i in keep], device=self.device)
        self._join(cache, mask, [rows[i] for i in keep], next_tokens)

    def _decode(self) -> None:
        """One token for every running sequence."""
        rows = self._rows
        ones = torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)

        assert self._cache is not None
        self._cache.reserve(1)
        started = time.perf_counter()
        logits = self._forward(self._next[:, None], self._mask, positions, self._cache, rows)
        self._cache.advance(1)
        tokens = self._sample(logits, rows)
        elapsed = time.perf_counter() - started

        for row in rows:
            row.position += 1
            row.device_seconds += elapsed / len(rows)
        self._observe(len(rows), len(rows))
        keep = [i for i, row in enumerate(rows) if not self._advance(row, tokens[i])]
        self._next = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if len(keep) < len(rows):
            self._select(keep)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
        rows: list[_Row],
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self._peft:
            kwargs["adapter_names"] = [row.peft_name for row in rows]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    # ---------------------------------------------------------------- batch bookkeeping
    def _new_row(self, request: GenerationRequest) -> _Row:
        generator = None
        if request.params.temperature > 0:
            generator = torch.Generator(device=self.device)
            seed = request.params.seed
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        peft_name = self.adapters[request.adapter] if request.adapter else BASE
        matcher = Grammars.matcher(request.grammar) if request.grammar is not None else None
        return _Row(
            request, peft_name, generator, position=len(request.prompt_ids), matcher=matcher
        )

    def _join(
        self, cache: DynamicCache, mask: torch.Tensor, rows: list[_Row], next_tokens: torch.Tensor
    ) -> None:
        """Append prefilled sequences to the running batch: their KV is written into the
        batch's slab (no copy of the running rows' KV), the shorter side left-padded."""
        if not self._rows or self._cache is None:
            self._cache = KVSlab(cache)
            self._mask, self._rows, self._next = mask, rows, next_tokens
            return
        self._cache.join(cache)
        length = self._cache.width
        self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
        self._rows = self._rows + rows
        self._next = torch.cat([self._next, next_tokens])

    def _select(self, keep: list[int]) -> None:
        """Keep only ``keep`` rows (the slab moves a row into each freed slot, so the order
        changes), then drop the columns that are padding in every row."""
        if not keep:
            self._rows, self._cache = [], None
            self._mask = self._mask[:0, :0]
            return
        assert self._cache is not None
        order = self._cache.keep(keep)
        self._rows = [self._rows[i] for i in order]
        index = torch.tensor(order, device=self.device)
        self._mask = self._mask[index]
        self._next = self._next[index]
        padding = int((self._mask.sum(dim=0) == 0).long().cumprod(dim=0).sum().item())
        if padding:
            self._mask = self._mask[:, padding:]
            self._cache.trim(padding)

    # ---------------------------------------------------------------- sampling and output
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
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

    def _advance(self, row: _Row, token: int) -> bool:
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
        total = len(request.prompt_ids) + len(row.generated)
        if reason is None and (
            len(row.generated) >= params.max_tokens or total >= self.context_window
        ):
            reason = "length"
        if reason is not None:
            row.finished = True
            _deliver(
                request,
                Chunk(text[row.emitted :], reason, len(row.generated), row.device_seconds),
            )
            return True
        # Hold back what could still become a stop sequence or is half a character.
        final = len(text) - max((len(s) - 1 for s in params.stop), default=0)
        if text.endswith("\ufffd"):
            final = min(final, len(text.rstrip("\ufffd")))
        if final > row.emitted:
            _deliver(request, Chunk(text[row.emitted : final]))
            row.emitted = final
        return False

    def _decoded(self, row: _Row, token: int) -> str:
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
            _deliver(request, Chunk("", "error", error=message))
        self._rows, self._cache = [], None
        self._mask = self._mask[:0, :0]
        self._next = self._next[:0]

    def _observe(self, size: int, tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(size, tokens)

    def _set_queue_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self._waiting))


def _deliver(request: GenerationRequest, chunk: Chunk) -> None:
    try:
        request.sink(chunk)
    except Exception:  # a client's closed event loop must not stop the engine
        log.debug("dropping a chunk for a request whose consumer is gone", exc_info=True)


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad an attention mask [B, T] with zeros to ``length`` columns."""
    missing = length - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
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


# -------------------------------------------------------------------- starting
def load_engine(
    spec: ModelDeploymentSpec,
    adapters: Sequence[ServedAdapter],
    paths: Paths,
    metrics: ServingMetrics | None = None,
) -> Engine:
    """Load the base model (quantized as the spec says), attach the adapters, start."""
    model, tokenizer, adapter_map = load_model(spec, adapters, paths)
    engine = Engine(
        model,
        tokenizer,
        adapter_map,
        max_batch_size=spec.batching.max_batch_size,
        max_queue=spec.batching.max_queue,
        context_window=spec.max_context_tokens,
        metrics=metrics,
    )
    # dynamic int8 (CPU) quantizes after the adapters are attached: a change of adapters
    # is a new engine (Server.apply_run swaps it in), not a load into this one
    engine.adapters_in_place = not (spec.quantization == "int8" and not torch.cuda.is_available())
    return engine
