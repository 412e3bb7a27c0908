"""The llama.cpp engine: a GGUF model run by llama.cpp's own kernels (through
llama-cpp-python's bindings of its C API) under Tailor's scheduler, for CPU serving.

One llama.cpp context holds every running sequence in one KV cache (``kv_unified``): each
request is a sequence id, and a step is one ``llama_decode`` of a batch that carries the
next token of every running sequence plus a chunk of the prompts still being read
(continuous batching with chunked prefill, as llama.cpp's server does it), so a new request
joins without waiting and a long prompt does not stall the others for long. Sampling,
formats, stop sequences and detokenization are the shared scheduler's
(:mod:`~tailor.workloads.serving.engine.scheduler`): the same request gets the same
treatment as from the builtin engine.

Prefix reuse: a finished prompt's cells are kept under a cache sequence id (LRU, a token
budget); a new prompt that starts the same way gets those cells by ``llama_memory_seq_cp``,
which in a unified cache adds the new sequence id to the shared cells (no copy), and only
the rest of its prompt is computed.

Adapters: PEFT LoRA adapters are converted to GGUF LoRA once
(:mod:`~tailor.workloads.serving.engine.gguf_files`). llama.cpp applies the adapters set on
the context to a whole ``llama_decode``, so a step decodes one batch per adapter among the
running sequences (llama.cpp's server batches only slots with equal adapters too); the cost
of mixing is printed by ``tests/bench/bench_serve.py``.

KV cells are reserved at admission (prompt plus ``max_tokens``, up to the context window):
a request that does not fit waits in the queue, so a step never runs out of cells
mid-answer. Cached prefixes have cells of their own beside the reserved ones (the prefix
cache's token budget), so they never make a request wait.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailor.api.modeldeployment import ModelDeploymentSpec
from tailor.api.workloads import Paths, ServedAdapter
from tailor.observability.serving import ServingMetrics
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.model_loading import load_tokenizer
from tailor.workloads.io.sources import model_path
from tailor.workloads.program import cpu_budget
from tailor.workloads.serving.engine.base import Chunk
from tailor.workloads.serving.engine.gguf_files import lora_file, model_file
from tailor.workloads.serving.engine.kvcache import PREFIX_CACHE_TOKENS, Prefix, PrefixCache
from tailor.workloads.serving.engine.scheduler import (
    BatchEngine,
    GenerationRequest,
    Row,
    deliver,
    eos_ids,
)

log = logging.getLogger("tailor.workloads.serving.engine.llamacpp")

BASE = "__base__"
PREFILL_CHUNK = 512
"""Prompt tokens read per step (with every running sequence's next token): longer prompts
take several steps, so running answers keep coming while a long prompt is read."""
KV_CELLS = 16384
"""KV cells for running sequences, at most (SmolLM2-135M: 23 KB each in f16): admission
waits when the running requests' reservations would pass it."""
PREFIX_SLOTS = 16
"""Sequence ids set aside for cached prefixes."""


def _llama() -> Any:
    """llama-cpp-python's bindings, quiet (llama.cpp logs every load to stderr)."""
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as exc:
        raise WorkloadError(
            "MissingDependency",
            "engine llamacpp needs llama-cpp-python (`make venv` builds it from its sdist, "
            "or the serving image has it): use engine builtin on this image",
        ) from exc
    _logger.set_verbose(False)
    return llama_cpp


@dataclass(eq=False)
class _Lora:
    """A loaded GGUF LoRA adapter: llama.cpp's handle, and a key for cached prefixes."""

    handle: Any
    key: str


@dataclass(eq=False)
class _Sequence(Row):
    """A request's sequence in the llama.cpp context."""

    seq: int = 0
    lora: _Lora | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    position: int = 0  # position of the next token fed
    next_token: int | None = None  # sampled, not yet fed
    reserved: int = 0  # KV cells reserved for it

    @property
    def prefix_key(self) -> str:
        return self.lora.key if self.lora else BASE


class LlamaEngine(BatchEngine):
    """Continuous batching over llama.cpp; a
    :class:`~tailor.workloads.serving.engine.base.TokenEngine`."""

    def __init__(
        self,
        model_file_path: Path,
        tokenizer: Any,
        adapters: dict[str, Path] | None = None,
        *,
        lora_base: Path | None = None,
        max_batch_size: int = 16,
        max_queue: int = 256,
        context_window: int | None = None,
        metrics: ServingMetrics | None = None,
        threads: int | None = None,
        kv_cells: int = KV_CELLS,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
    ):
        llama = self._lib = _llama()
        llama.llama_backend_init()
        self.model_file = model_file_path
        self.lora_base = lora_base or model_file_path  # what adapters are converted against
        params = llama.llama_model_default_params()
        self._model = llama.llama_model_load_from_file(str(model_file_path).encode(), params)
        if not self._model:
            raise WorkloadError("ModelLoadFailed", f"llama.cpp could not load {model_file_path}")
        vocab = llama.llama_model_get_vocab(self._model)
        n_vocab = llama.llama_vocab_n_tokens(vocab)
        trained = llama.llama_model_n_ctx_train(self._model)
        window = min(context_window or trained, trained)
        configured = {llama.llama_vocab_eos(vocab), llama.llama_vocab_eot(vocab)} - {-1}
        max_batch_size = min(max_batch_size, 256 - PREFIX_SLOTS)  # llama.cpp: 256 sequences
        super().__init__(
            tokenizer,
            vocab_size=n_vocab,
            logits_size=n_vocab,
            eos_ids=eos_ids(tokenizer, sorted(configured)),
            context_window=window,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            metrics=metrics,
            name="tailor-llamacpp",
        )
        self._cells = max(window, min(kv_cells, window * max_batch_size))
        self._reserved = 0
        threads = threads or cpu_budget()
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = self._cells + prefix_cache_tokens
        cparams.n_batch = PREFILL_CHUNK + max_batch_size
        cparams.n_ubatch = PREFILL_CHUNK + max_batch_size
        cparams.n_seq_max = max_batch_size + PREFIX_SLOTS
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one cache: prefix cells shared by sequence ids
        cparams.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise WorkloadError("ModelLoadFailed", "llama.cpp could not create a context")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(cparams.n_batch, 0, 1)
        self._free_seqs = list(range(max_batch_size + PREFIX_SLOTS))
        self._active_lora: _Lora | bool | None = False  # False: not set yet
        self._prefixes = (
            PrefixCache(prefix_cache_tokens, PREFIX_SLOTS, self._forget_prefix)
            if prefix_cache_tokens
            else None
        )
        for name, path in (adapters or {}).items():
            self._load_adapter(name, str(path))
        self._start()

    # ---------------------------------------------------------------- adapters
    def _load_adapter(self, name: str, path: str) -> None:
        started = time.perf_counter()
        try:
            converted = lora_file(Path(path), self.lora_base)
        except WorkloadError:
            raise
        except Exception as exc:
            raise WorkloadError("AdapterLoadFailed", f"adapter {name} at {path}: {exc}") from exc
        handle = self._lib.llama_adapter_lora_init(self._model, str(converted).encode())
        if not handle:
            raise WorkloadError(
                "AdapterLoadFailed",
                f"adapter {name} at {path}: llama.cpp refused its GGUF LoRA (a different base "
                "model?)",
            )
        # adapters live as long as the model (llama.cpp frees them with it); a replaced one
        # stays loaded for the sequences still using it
        self.adapters = {**self.adapters, name: _Lora(handle, converted.stem)}
        log.info("adapter %s loaded in %.2f s", name, time.perf_counter() - started)

    def _unload_adapter(self, name: str) -> None:
        if name in self.adapters:
            self.adapters = {k: v for k, v in self.adapters.items() if k != name}
            log.info("adapter %s unloaded", name)

    def _use_lora(self, lora: _Lora | None) -> None:
        if self._active_lora is lora:
            return
        if lora is None:
            failed = self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (self._lib.llama_adapter_lora_p_ctypes * 1)(lora.handle)
            scales = (ctypes.c_float * 1)(1.0)
            failed = self._lib.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if failed:
            raise RuntimeError("llama.cpp could not set the adapter")
        self._active_lora = lora

    # ---------------------------------------------------------------- admission
    def _room(self) -> int:
        return min(self.max_batch_size - len(self._rows), len(self._free_seqs))

    def _admit(self, requests: list[GenerationRequest]) -> None:
        for index, request in enumerate(requests):
            if request.cancelled:
                deliver(request, Chunk("", "cancelled"))
                continue
            lora = self.adapters.get(request.adapter) if request.adapter else None
            if request.adapter and lora is None:  # unloaded while it waited
                deliver(request, Chunk("", "error", error=f"unknown adapter {request.adapter}"))
                continue
            need = min(len(request.prompt_ids) + request.params.max_tokens, self.context_window)
            if self._reserved + need > self._cells or not self._free_seqs:
                self._requeue(requests[index:])  # waits until running answers free cells
                return
            self._start_sequence(request, lora, need)

    def _start_sequence(self, request: GenerationRequest, lora: _Lora | None, need: int) -> None:
        row = _Sequence(request, seq=self._free_seqs.pop(), lora=lora, reserved=need)
        row.start()
        self._reserved += need
        shared = 0
        if self._prefixes is not None:
            hit = self._prefixes.longest(row.prefix_key, request.prompt_ids)
            if hit is not None:
                prefix, shared = hit
                self._lib.llama_memory_seq_cp(self._memory, prefix.layers, row.seq, 0, shared)
        self._observe_prefix(shared, len(request.prompt_ids) - shared)
        row.pending = request.prompt_ids[shared:]
        row.position = shared
        self._rows.append(row)

    def _evict_prefix(self) -> bool:
        return self._prefixes is not None and self._prefixes.evict_oldest()

    def _forget_prefix(self, prefix: Prefix) -> None:
        self._lib.llama_memory_seq_rm(self._memory, prefix.layers, -1, -1)
        self._free_seqs.append(prefix.layers)

    def _remember(self, row: _Sequence) -> None:
        """Keep a read prompt's cells under a cache sequence id for prompts that start the
        same way (the cells are shared, not copied)."""
        ids = row.request.prompt_ids
        if self._prefixes is None or not self._prefixes.worth_keeping(row.prefix_key, ids):
            return
        if len(self._free_seqs) <= self.max_batch_size - len(self._rows):
            if not self._evict_prefix():  # keep enough ids for a full batch
                return
        seq = self._free_seqs.pop()
        self._lib.llama_memory_seq_cp(self._memory, row.seq, seq, 0, len(ids))
        self._prefixes.put(row.prefix_key, ids, seq)

    # ---------------------------------------------------------------- a step
    def _step(self) -> None:
        """Feed every running sequence's next token and a chunk of the prompts being read;
        one ``llama_decode`` per adapter among them."""
        for row in [r for r in self._rows if r.request.cancelled]:
            self._finish(row, Chunk("", "cancelled", len(row.generated), row.device_seconds))
        budget = PREFILL_CHUNK
        groups: dict[int, list[tuple[_Sequence, list[int]]]] = {}
        for row in self._rows:
            if row.next_token is not None:
                tokens = [row.next_token]
            else:
                tokens = row.pending[: max(budget, 0)]
                if not tokens:
                    continue  # waits for prefill budget in a later step
                budget -= len(tokens)
            groups.setdefault(id(row.lora), []).append((row, tokens))
        for group in groups.values():
            self._decode_group(group)

    def _decode_group(self, group: list[tuple[_Sequence, list[int]]]) -> None:
        llama, batch = self._lib, self._batch
        self._use_lora(group[0][0].lora)
        n = 0
        outputs: list[tuple[_Sequence, int]] = []  # rows that sample, and their batch index
        for row, tokens in group:
            reads_prompt = row.next_token is None
            for k, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = row.position + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = row.seq
                last = k == len(tokens) - 1 and (
                    not reads_prompt or len(tokens) == len(row.pending)
                )
                batch.logits[n] = last
                if last:
                    outputs.append((row, n))
                n += 1
        batch.n_tokens = n
        started = time.perf_counter()
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for row, tokens in group:
            row.position += len(tokens)
            if row.next_token is None:
                row.pending = row.pending[len(tokens) :]
        logits = torch.from_numpy(
            np.stack(
                [
                    np.ctypeslib.as_array(
                        llama.llama_get_logits_ith(self._ctx, index), shape=(self.logits_size,)
                    )
                    for _, index in outputs
                ]
            )
            if outputs
            else np.zeros((0, self.logits_size), dtype=np.float32)
        )
        sampled = self._sample(logits, [row for row, _ in outputs]) if outputs else []
        share = (time.perf_counter() - started) / max(1, len(group))
        for row, _ in group:
            row.device_seconds += share
        self._observe(len(group), len(outputs))
        for (row, _), token in zip(outputs, sampled, strict=True):
            if row.next_token is None:  # its prompt is read: keep it for later prompts
                self._remember(row)
            if self._advance(row, token, len(row.request.prompt_ids)):
                self._release(row)
            else:
                row.next_token = token

    def _finish(self, row: _Sequence, chunk: Chunk) -> None:
        deliver(row.request, chunk)
        row.finished = True
        self._release(row)

    def _release(self, row: _Sequence) -> None:
        self._lib.llama_memory_seq_rm(self._memory, row.seq, -1, -1)
        self._free_seqs.append(row.seq)
        self._reserved -= row.reserved
        self._rows = [r for r in self._rows if r is not row]

    def _reset(self) -> None:
        for row in list(self._rows):
            self._release(row)

    def close(self) -> None:
        super().close()
        if getattr(self, "_ctx", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None


def gguf_source(spec: ModelDeploymentSpec, paths: Paths) -> Path:
    """The GGUF file of a deployment's base model; WorkloadError when it has none."""
    location = model_path(spec.base_model, paths)
    path = Path(location)
    if path.suffix != ".gguf" or not path.is_file():
        raise WorkloadError(
            "ModelNotGGUF",
            f"engine llamacpp serves GGUF models (builtin, or a .gguf file on a volume); "
            f"{location} is not one: use engine builtin",
        )
    return path


def load_llama_engine(
    spec: ModelDeploymentSpec,
    adapters: Sequence[ServedAdapter],
    paths: Paths,
    metrics: ServingMetrics | None = None,
) -> LlamaEngine:
    """The deployment's GGUF at its quantization (converted once, cached), its adapters
    converted to GGUF LoRA, one llama.cpp context."""
    source = gguf_source(spec, paths)
    served = model_file(source, gguf_quantization(spec.quantization))
    tokenizer = load_tokenizer(spec.base_model, paths)
    return LlamaEngine(
        served,
        tokenizer,
        {adapter.name: Path(adapter.path) for adapter in adapters},
        lora_base=source,
        max_batch_size=spec.batching.max_batch_size,
        max_queue=spec.batching.max_queue,
        context_window=spec.max_context_tokens,
        metrics=metrics,
    )


def gguf_quantization(quantization: str) -> str:
    """The GGUF file a deployment's quantization serves: ``none`` the model's own file,
    ``int8`` q8_0, a GGUF type itself."""
    return {"int8": "q8_0"}.get(quantization, quantization)
