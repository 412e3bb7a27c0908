"""Applying a PromptProfile to a chat conversation: the system text, the few-shot turns, the
user turn rendered through the profile's sandboxed Jinja2 template (with ``question``,
``context`` and the profile's and the request's variables) and the default generation
parameters a request may override.

The functions here are pure (no model, no I/O) so that the PromptProfile controller can
validate and preview a profile with exactly the rendering the server uses. The one stateful
piece is :class:`ProfileFile`, the server's view of the mounted profile: it re-reads the
file whenever its modification time, size or inode changes (a ConfigMap update swaps a
symlink), keeping the last valid profile when a new one does not parse.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from tailor.api.base import describe_errors
from tailor.api.promptprofile import (
    FewShotExample,
    FewShotSelection,
    GenerationParameters,
    PromptProfileSpec,
)

log = logging.getLogger("tailor.workloads.serving.prompting")

MAX_RENDERED_CHARS = 1_000_000
DEFAULT_CONTEXT_INTRO = (
    "Answer the question using the context below. If the context does not contain the "
    "answer, say so."
)


class PromptError(ValueError):
    """A template that does not parse or render (syntax, undefined variable, sandbox)."""

    def __init__(self, message: str, param: str = "template"):
        super().__init__(message)
        self.param = param


class ContextDocument(Protocol):
    """A retrieved chunk as the prompt needs it (the retriever's RetrievedChunk fits)."""

    @property
    def text(self) -> str: ...

    @property
    def title(self) -> str | None: ...

    @property
    def source(self) -> str | None: ...


@dataclass(frozen=True)
class Message:
    """One chat turn in the model's terms."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable Jinja2 sandbox, also refusing ``*`` and ``**`` that would build huge
    values (``{{ 'x' * 10**9 }}``): a template must not be able to exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("exponent too large in template")
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(count, int)
                    and len(seq) * count > MAX_RENDERED_CHARS
                ):
                    raise SecurityError("repetition too large in template")
            return operator.mul(left, right)
        return super().call_binop(context, op, left, right)


_ENV = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


def template_variables(source: str) -> set[str]:
    """The variables a template reads (for validation: which variables it needs)."""
    try:
        return set(_variables(source))
    except TemplateError as exc:
        raise PromptError(f"template does not parse: {exc}") from exc


# A profile's template is parsed and compiled once, not on every request (compiling took
# ~12% of the gateway's time per request, profiled at 16 clients); errors are not cached.
@functools.lru_cache(maxsize=256)
def _variables(source: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(_ENV.parse(source)))


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def render_template(source: str, variables: Mapping[str, Any], param: str = "template") -> str:
    """Render ``source`` in the sandbox; every variable it reads must be given."""
    try:
        rendered = _compiled(source).render(**variables)
    except SecurityError as exc:
        raise PromptError(f"{param}: refused by the template sandbox: {exc}", param) from exc
    except TemplateError as exc:
        raise PromptError(f"{param}: {exc}", param) from exc
    if len(rendered) > MAX_RENDERED_CHARS:
        raise PromptError(f"{param}: renders to more than {MAX_RENDERED_CHARS} characters", param)
    return rendered


def format_context(documents: Sequence[ContextDocument]) -> str:
    """The ``context`` variable: numbered documents, each with its title and source."""
    blocks = []
    for number, doc in enumerate(documents, start=1):
        heading = " - ".join(part for part in (doc.title, doc.source) if part)
        blocks.append(f"[{number}] {heading}\n{doc.text}" if heading else f"[{number}] {doc.text}")
    return "\n\n".join(blocks)


def render_user_turn(
    profile: PromptProfileSpec,
    question: str,
    documents: Sequence[ContextDocument] | None = None,
    variables: Mapping[str, str] | None = None,
) -> str:
    """The last user turn: the template rendered with question, context and variables.

    With documents and a template that does not read ``context``, a default context block
    is put before the rendered turn, so that retrieval works with any profile.
    """
    context = format_context(documents) if documents else ""
    values: dict[str, Any] = {
        **profile.variables,
        **(variables or {}),
        "question": question,
        "context": context,
        "documents": [_document_dict(d) for d in documents or ()],
    }
    rendered = render_template(profile.template, values)
    if documents and not template_variables(profile.template) & {"context", "documents"}:
        rendered = f"{DEFAULT_CONTEXT_INTRO}\n\nContext:\n{context}\n\nQuestion: {rendered}"
    return rendered


def select_examples(
    selection: FewShotSelection, question: str | None, embed: Callable[[list[str]], Any] | None
) -> list[FewShotExample]:
    """The pool examples a question gets: the first k (static, or no question), else the k
    whose user turn is nearest to the question by cosine of ``embed``'s normalised vectors,
    ordered so the nearest comes last (next to the question)."""
    pool = selection.pool or []
    if selection.select == "static" or not question or embed is None:
        return list(pool[: selection.k])
    vectors = embed([question] + [example.user for example in pool])
    scores = vectors[1:] @ vectors[0]
    nearest = sorted(range(len(pool)), key=lambda i: (-float(scores[i]), i))[: selection.k]
    return [pool[i] for i in reversed(nearest)]


def build_messages(
    profile: PromptProfileSpec | None,
    conversation: Sequence[Message],
    documents: Sequence[ContextDocument] | None = None,
    variables: Mapping[str, str] | None = None,
    examples: Sequence[FewShotExample] = (),
) -> list[Message]:
    """The conversation the model sees.

    In order: one system message (the profile's system text, rendered with the variables,
    followed by the request's own system messages), the profile's few-shot turns (then
    ``examples``, those chosen for this question by :func:`select_examples`), the
    earlier turns unchanged, and the last user turn through :func:`render_user_turn`.
    Without a profile the conversation is unchanged except for the default context block.
    """
    profile = profile or PromptProfileSpec()
    values = {**profile.variables, **(variables or {})}
    system_parts = []
    if profile.system:
        system_parts.append(render_template(profile.system, values, param="system"))
    system_parts += [m.content for m in conversation if m.role == "system" and m.content]
    turns = [m for m in conversation if m.role != "system"]

    out = [Message("system", "\n\n".join(system_parts))] if system_parts else []
    for example in [*profile.few_shot, *examples]:
        out += [Message("user", example.user), Message("assistant", example.assistant)]
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=None)
    for index, message in enumerate(turns):
        if index == last_user:
            content = render_user_turn(profile, message.content, documents, variables)
            message = Message("user", content)
        out.append(message)
    return out


def last_user_message(conversation: Sequence[Message]) -> str | None:
    """The text retrieval should search for: the last user turn."""
    return next((m.content for m in reversed(conversation) if m.role == "user"), None)


def merge_parameters(
    profile: PromptProfileSpec | None, overrides: Mapping[str, Any]
) -> GenerationParameters:
    """The profile's default parameters with the request's non-null values on top."""
    defaults = (profile or PromptProfileSpec()).parameters
    given = {k: v for k, v in overrides.items() if v is not None}
    return defaults.model_copy(update=given)


def _document_dict(doc: ContextDocument) -> dict[str, Any]:
    return {
        "text": doc.text,
        "title": doc.title,
        "source": doc.source,
        "score": getattr(doc, "score", None),
        "metadata": getattr(doc, "metadata", None) or {},
    }


def parse_profile(data: str | bytes) -> PromptProfileSpec:
    """A profile from its JSON wire form (what the operator mounts), with its templates
    checked to parse; errors name the field."""
    try:
        profile = PromptProfileSpec.model_validate_json(data)
    except ValidationError as exc:
        raise PromptError("; ".join(describe_errors(exc, "promptProfile")), "profile") from exc
    template_variables(profile.template)
    template_variables(profile.system)
    return profile


class ProfileFile:
    """The mounted profile, re-read when the file changes (checked on every ``get``).

    A file that becomes invalid keeps the last valid profile in force (and is reported
    through ``on_reload``) rather than breaking the server; a missing file means no profile.
    """

    def __init__(self, path: str | Path, on_reload: Callable[[bool], None] | None = None):
        self.path = Path(path)
        self.on_reload = on_reload
        self.error: str | None = None
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._profile: PromptProfileSpec | None = None

    def get(self) -> PromptProfileSpec | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return self._profile
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._key:
            return self._profile
        with self._lock:
            if key != self._key:
                self._load(key)
        return self._profile

    def _load(self, key: tuple[int, int, int]) -> None:
        self._key = key
        try:
            self._profile = parse_profile(self.path.read_bytes())
            self.error = None
            log.info("prompt profile loaded from %s", self.path)
        except (PromptError, OSError) as exc:
            self.error = str(exc)
            log.error("prompt profile %s is invalid, keeping the previous one: %s", self.path, exc)
        if self.on_reload:
            self.on_reload(self.error is None)
