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

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths, ServedAdapter
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.serving.engine.base import Chunk
from tailor.workloads.serving.engine.kvcache import PREFIX_CACHE_TOKENS, KVSlab, Prefix, PrefixCache
from tailor.workloads.serving.engine.loading import attach_adapter, load_model
from tailor.workloads.serving.engine.scheduler import (
    BatchEngine,
    GenerationRequest,
    Row,
    deliver,
    eos_ids,
)

log = logging.getLogger("tailor.workloads.serving.engine.builtin")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass(eq=False)
class _Row(Row):
    """A request's sequence in the running batch."""

    peft_name: str = BASE
    position: int = 0  # position id of the next token fed to the model


class Engine(BatchEngine):
    """Continuous-batching generation over a (PEFT) causal LM; thread-safe ``submit``. A
    :class:`~tailor.workloads.serving.engine.base.TokenEngine`."""

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
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        super().__init__(
            tokenizer,
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),
            logits_size=int(model.get_output_embeddings().weight.shape[0]),
            eos_ids=eos_ids(tokenizer, configured),
            context_window=context_window
            or int(getattr(model.config, "max_position_embeddings", 2048)),
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            metrics=metrics,
            name="tailor-engine",
        )
        self.model = model
        self.adapters = dict(adapters or {})  # served adapter name -> PEFT adapter name
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._peft = bool(self.adapters)
        # a sliding-window cache keeps only its window: a stored prefix would not fit it
        windowed = getattr(model.config, "sliding_window", None) is not None
        self._prefixes = (
            PrefixCache(prefix_cache_tokens) if prefix_cache_tokens and not windowed else None
        )
        self._adapter_ids = itertools.count(len(self.adapters))
        self._retired: set[str] = set()  # PEFT adapters unloaded once no running row uses them
        self.adapters_in_place = True
        """Adapters load into the running model (not after dynamic int8: see load_engine)."""
        # Running batch: one row per sequence, aligned with the cache's batch dimension.
        self._rows: list[_Row] = []
        self._cache: KVSlab | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._next = torch.zeros((0,), dtype=torch.long, device=self.device)
        self._start()

    def load_adapter(self, name: str, path: str) -> None:
        if not self.adapters_in_place:
            raise WorkloadError(
                "AdapterLoadFailed",
                f"adapter {name}: this model's dynamic int8 layers take no LoRA once "
                "quantized; the server loads a new engine with it instead",
            )
        super().load_adapter(name, path)

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

    def _between_steps(self) -> None:
        if self._retired:
            self._free_retired()

    def _admit(self, requests: list[GenerationRequest]) -> None:
        self._prefill_isolated(requests)

    def _step(self) -> None:
        self._decode()

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._mask[:0, :0]
        self._next = self._next[:0]

    # ---------------------------------------------------------------- scheduler
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
                deliver(request, Chunk("", "error", error="generation failed"))
        if plain:
            self._prefill_plain(plain)

    def _prefill_plain(self, requests: list[GenerationRequest]) -> None:
        try:
            self._prefill(requests)
            return
        except Exception:
            if len(requests) == 1:
                log.exception("a request failed in prefill; failing it alone")
                deliver(requests[0], Chunk("", "error", error="generation failed"))
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
        if not self._advance_row(row, token):
            self._join(cache, mask, [row], torch.tensor([token], device=self.device))

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
        keep = [i for i, row in enumerate(rows) if not self._advance_row(row, tokens[i])]
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
        keep = [i for i, row in enumerate(rows) if not self._advance_row(row, tokens[i])]
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

    def _advance_row(self, row: _Row, token: int) -> bool:
        return self._advance(row, token, len(row.request.prompt_ids))

    # ---------------------------------------------------------------- batch bookkeeping
    def _new_row(self, request: GenerationRequest) -> _Row:
        peft_name = self.adapters[request.adapter] if request.adapter else BASE
        row = _Row(request, peft_name=peft_name, position=len(request.prompt_ids))
        row.start(self.device)
        return row

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


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad an attention mask [B, T] with zeros to ``length`` columns."""
    missing = length - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


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
