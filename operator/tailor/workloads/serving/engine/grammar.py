"""Enforced output formats (OpenAI's ``response_format``) by constrained decoding.

The builtin engine asks xgrammar (Apache-2.0; the grammar engine vLLM, SGLang and
TensorRT-LLM use) for the tokens that may come next: before each sampling step, a row with
a format gets a bitmask over the vocabulary, and tokens that would leave the grammar get
-inf. So a ``json_object`` answer is always JSON and a ``json_schema`` answer always
validates, whatever the model would have preferred; a row without a format is untouched.
Grammars are compiled once per format (schemas are small; compiling one takes about 15 ms
on a CPU core) and cached; each request gets its own matcher, advanced by every token it
accepts. Answers are compact JSON (no whitespace between tokens of the JSON itself, as
``json.dumps(..., separators=(",", ":"))`` writes it): a grammar that allows any whitespace
lets a small model fill its whole budget with newlines and never close the object.

Why xgrammar rather than lm-format-enforcer: the mask is computed in C++ from a grammar
precompiled against the vocabulary (its per-token cost is printed by
``tests/bench/bench_format.py``), where lm-format-enforcer walks a character-level parser
over the token trie in Python each step; and lm-format-enforcer 0.11.3 does not import with
transformers 5 (its integration imports ``transformers.tokenization_utils``'s
``PreTrainedTokenizerBase``, which moved).
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

FORMATS = ("text", "json_object", "json_schema")


class FormatError(ValueError):
    """A response format that cannot be enforced (unknown type, invalid schema)."""


def format_key(kind: str | None, schema: dict[str, Any] | None = None) -> str | None:
    """The canonical form of a response format, hashable and cacheable: None for text,
    else JSON ``{"type": ..., "schema": ...}`` (the schema's key order kept: answers
    list properties in that order)."""
    if kind in (None, "text"):
        return None
    if kind not in FORMATS:
        raise FormatError(f"type must be one of {', '.join(FORMATS)}, not {kind!r}")
    if kind == "json_schema":
        if not isinstance(schema, dict):
            raise FormatError("json_schema needs a schema (an object)")
        key = json.dumps({"type": kind, "schema": schema})  # the schema's own key order
        check_schema(key)
        return key
    return json.dumps({"type": kind})


@functools.lru_cache(maxsize=256)
def check_schema(key: str) -> None:
    """Raise FormatError when the schema of a format key is not a valid JSON Schema (its own
    metaschema). Cached by key: a profile's format is checked once, not on every request."""
    from tailor.api.promptprofile import check_json_schema

    try:
        check_json_schema(json.loads(key)["schema"])
    except ValueError as exc:
        raise FormatError(str(exc)) from exc


class Grammars:
    """Compiled grammars of one tokenizer, by format key (least recently used dropped)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], size: int = 64
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._size = size
        self._compiler: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # the cache of compiled grammars
        self._compiler_lock = threading.Lock()

    def _get_compiler(self) -> Any:
        import xgrammar as xgr

        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, key: str) -> Any:
        """The compiled grammar of a format key; FormatError when it cannot be built. The
        lock guards the cache only, not a compile: a found grammar (what the engine's submit
        asks for, on the event loop) never waits for another format's compile, which can
        take seconds (the gateway compiles off the event loop first, one at a time)."""
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiler = self._get_compiler()
        spec = json.loads(key)
        try:
            schema = spec.get("schema") or {"type": "object"}  # json_object: any object
            compiled = compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, strict_mode=True
            )
        except Exception as exc:  # xgrammar raises RuntimeError for unsupported schemas
            raise FormatError(f"the schema cannot be enforced: {exc}") from exc
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
        return compiled

    @staticmethod
    def matcher(compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)


def mask_logits(logits: torch.Tensor, matchers: Sequence[tuple[int, Any]]) -> None:
    """Set to -inf, in place, the logits of tokens each (row, matcher) may not take next."""
    if not matchers:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, matcher in matchers:
        matcher.fill_next_token_bitmask(bitmask, row)
    indices = [row for row, _ in matchers]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=indices)
