"""The builtin engine's key/value caches: the running batch's in preallocated buffers (the KV
slab), and recent prompts' for reuse (the prefix cache).

transformers' ``DynamicCache`` grows by concatenation: every decode step copies every
layer's whole cache to append one token, and every request that joins a running batch
copies it again (left-padding both sides). Measured on SmolLM2-135M, 16 rows of ~200
tokens, 2 CPU cores: the concatenations were 21% of a decode step.

Here each layer's keys and values live in buffers ``[rows, heads, capacity, head_dim]``
with room on both sides of the live window ``[start, end)``, which all rows share (rows
are left-padded; the engine's attention mask hides the padding). A decode step writes one
column in place and attention reads a view. A joining request's prompt KV is written into
free rows; a prompt longer than the window moves ``start`` left into the headroom. A
finished row's slot is filled by the last row (one row copied, not the batch). Padding
that every row has is dropped by moving ``start``. Only when the window reaches a
buffer's edge, or rows outgrow it, is the live window copied into new buffers, with room
again (amortized: each time the room grows with the window).

Columns inside the window that a row does not use are zeros, as ``DynamicCache``'s
left padding was: a masked column must not hold a NaN (it would reach the softmax).

The prefix cache (:class:`PrefixCache`) keeps the KV of recent prompts, so a new prompt that
starts as one of them (a prompt profile's system prompt and few-shot block, a conversation's
earlier turns) computes only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 128
"""Free columns kept before and after the window when buffers are (re)allocated."""
PREFIX_CACHE_TOKENS = 4096
"""Prompt tokens whose KV the prefix cache keeps (SmolLM2-135M: 46 KB each in float32)."""
PREFIX_MIN_TOKENS = 32
"""The shortest shared prefix worth reusing."""


class _SlabLayer(DynamicLayer):  # type: ignore[misc]
    """One layer of a :class:`KVSlab`: writes at the slab's ``end``, returns the window."""

    def __init__(self, slab: KVSlab, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.slab = slab
        self.k_buffer, self.v_buffer = keys, values
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        self._view()

    def _view(self) -> None:
        s = self.slab
        self.keys = self.k_buffer[: s.rows, :, s.start : s.end]
        self.values = self.v_buffer[: s.rows, :, s.start : s.end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slab
        new = key_states.shape[2]
        if s.end + new > self.k_buffer.shape[2]:  # the engine reserves first (KVSlab.reserve)
            raise RuntimeError("KV slab full: reserve() was not called before the forward pass")
        self.k_buffer[: s.rows, :, s.end : s.end + new] = key_states
        self.v_buffer[: s.rows, :, s.end : s.end + new] = value_states
        keys = self.k_buffer[: s.rows, :, s.start : s.end + new]
        values = self.v_buffer[: s.rows, :, s.start : s.end + new]
        return keys, values

    def get_seq_length(self) -> int:
        return self.slab.end - self.slab.start


class KVSlab(DynamicCache):  # type: ignore[misc]
    """The running batch's cache (see the module docstring). ``rows`` sequences share the
    columns ``[start, end)``; the engine keeps its mask ``end - start`` wide."""

    rows: int
    start: int
    end: int

    def __init__(self, prefill: DynamicCache):
        """A slab holding the rows of a prefill's cache (copied once)."""
        first: Any = prefill.layers[0]
        batch, _, length, _ = first.keys.shape
        self.rows, self.start, self.end = 0, ROOM + length, ROOM + length
        sources: list[Any] = prefill.layers
        layers = [
            _SlabLayer(self, *self._buffers(layer.keys, batch, ROOM + length + ROOM))
            for layer in sources
        ]
        super().__init__()
        self.layers = layers
        self.join(prefill)

    @staticmethod
    def _buffers(like: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, heads, _, dim = like.shape
        shape = (rows, heads, columns, dim)
        return (
            torch.zeros(shape, dtype=like.dtype, device=like.device),
            torch.zeros(shape, dtype=like.dtype, device=like.device),
        )

    @property
    def _slab_layers(self) -> list[_SlabLayer]:
        return self.layers

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) of the buffers."""
        k = self._slab_layers[0].k_buffer
        return int(k.shape[0]), int(k.shape[2])

    @property
    def width(self) -> int:
        return self.end - self.start

    def _relocate(self, rows: int, front: int) -> None:
        """Copy the window into new buffers with ``rows`` rows, at least ``front`` free
        columns before it and :data:`ROOM` (or the window's width) after it. All layers'
        buffers are made before any is swapped in: a failed allocation leaves the slab as
        it was."""
        width = self.width
        start = max(front, ROOM)
        columns = start + width + max(ROOM, width)
        moved = []
        for layer in self._slab_layers:
            keys, values = self._buffers(layer.k_buffer, rows, columns)
            window = slice(self.start, self.end)
            keys[: self.rows, :, start : start + width] = layer.k_buffer[: self.rows, :, window]
            values[: self.rows, :, start : start + width] = layer.v_buffer[: self.rows, :, window]
            moved.append((keys, values))
        for layer, (keys, values) in zip(self._slab_layers, moved, strict=True):
            layer.k_buffer, layer.v_buffer = keys, values
        self.start, self.end = start, start + width
        self._views()

    def _views(self) -> None:
        for layer in self._slab_layers:
            layer._view()

    def reserve(self, new: int) -> None:
        """Make room for ``new`` columns after the window (before a forward pass)."""
        rows, columns = self.capacity
        if self.end + new > columns:
            self._relocate(rows, ROOM)

    def advance(self, new: int) -> None:
        """The forward pass wrote ``new`` columns: they join the window."""
        self.end += new
        self._views()

    def join(self, prefill: DynamicCache) -> None:
        """Append a prefill's rows (left-padded to their longest prompt) to the batch; the
        window widens on the left when they are longer than it."""
        first: Any = prefill.layers[0]
        added, length = first.keys.shape[0], first.keys.shape[2]
        rows, _ = self.capacity
        grow = max(length - self.width, 0)
        if self.rows + added > rows:
            rows = max(self.rows + added, 2 * rows)
        if rows > self.capacity[0] or self.start < grow:
            self._relocate(rows, grow + ROOM)
        old, start = self.rows, self.start - grow
        for layer, source in zip(self._slab_layers, prefill.layers, strict=True):
            new: Any = source
            if grow and old:  # the old rows' new left columns are padding
                layer.k_buffer[:old, :, start : self.start] = 0
                layer.v_buffer[:old, :, start : self.start] = 0
            rows_k = layer.k_buffer[old : old + added, :, start : self.end]
            rows_v = layer.v_buffer[old : old + added, :, start : self.end]
            rows_k[:, :, : rows_k.shape[2] - length] = 0
            rows_v[:, :, : rows_v.shape[2] - length] = 0
            rows_k[:, :, rows_k.shape[2] - length :] = new.keys
            rows_v[:, :, rows_v.shape[2] - length :] = new.values
        self.rows += added
        self.start = start
        self._views()

    def keep(self, keep: list[int]) -> list[int]:
        """Keep the rows ``keep`` (sorted): each freed slot below the new row count takes
        a kept row from above it. Returns the new order (old row index per new row)."""
        count = len(keep)
        kept = set(keep)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in keep if i >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            to = torch.tensor(holes, device=self._slab_layers[0].k_buffer.device)
            source = torch.tensor(movers, device=to.device)
            for layer in self._slab_layers:
                for buffer in (layer.k_buffer, layer.v_buffer):
                    window = buffer[:, :, self.start : self.end]
                    window.index_copy_(0, to, window.index_select(0, source))
        self.rows = count
        self._views()
        return order

    def trim(self, columns: int) -> None:
        """Drop the window's first ``columns`` (padding in every row)."""
        self.start += columns
        self._views()


@dataclass
class Prefix:
    """A prompt's KV cache: the builtin engine's per layer ``(keys, values)`` of shape (1,
    heads, tokens, dim); the llama.cpp engine's sequence id whose cells hold it."""

    ids: list[int]
    layers: Any


class PrefixCache:
    """The KV of recent prompts (per adapter: LoRA changes the keys and values), reused for
    the longest prefix a new prompt shares with one of them: the system prompt and
    few-shot block of a prompt profile, or a conversation's earlier turns, are computed
    once. Least recently used prompts go first when the token budget is full."""

    def __init__(
        self,
        budget_tokens: int = PREFIX_CACHE_TOKENS,
        max_entries: int | None = None,
        on_evict: Callable[[Prefix], None] | None = None,
    ):
        self.budget = budget_tokens
        self.max_entries = max_entries
        self.on_evict = on_evict  # frees what an entry holds (the llama.cpp engine's cells)
        self.tokens = 0
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], Prefix] = OrderedDict()

    def longest(self, peft_name: str, ids: Sequence[int]) -> tuple[Prefix, int] | None:
        """The cached prompt sharing the longest prefix with ``ids`` (at least
        PREFIX_MIN_TOKENS, and at most all but the last token, whose logits are needed)."""
        best: tuple[Prefix, int] | None = None
        for (name, _), entry in self.entries.items():
            if name != peft_name:
                continue
            shared = _common_prefix(entry.ids, ids, len(ids) - 1)
            if shared >= PREFIX_MIN_TOKENS and (best is None or shared > best[1]):
                best = (entry, shared)
        if best is not None:
            self.entries.move_to_end((peft_name, tuple(best[0].ids)))
        return best

    def worth_keeping(self, peft_name: str, ids: Sequence[int]) -> bool:
        """Whether :meth:`put` would keep this prompt (not too short, long or known)."""
        return (
            PREFIX_MIN_TOKENS <= len(ids) <= self.budget
            and (peft_name, tuple(ids)) not in self.entries
        )

    def put(self, peft_name: str, ids: Sequence[int], layers: Any) -> None:
        if not self.worth_keeping(peft_name, ids):
            return
        while self.entries and (
            self.tokens + len(ids) > self.budget
            or (self.max_entries is not None and len(self.entries) >= self.max_entries)
        ):
            self.evict_oldest()
        self.entries[(peft_name, tuple(ids))] = Prefix(list(ids), layers)
        self.tokens += len(ids)

    def evict_oldest(self) -> bool:
        """Drop the least recently used prompt (False when there is none)."""
        if not self.entries:
            return False
        _, old = self.entries.popitem(last=False)
        self.tokens -= len(old.ids)
        if self.on_evict is not None:
            self.on_evict(old)
        return True


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n
