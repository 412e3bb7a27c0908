"""The gateway's wire protocol: OpenAI's request models (with Tailor's ``tailor`` extension),
errors in OpenAI's shape, and the response bodies (whole, or streamed as server-sent events).
Pure: nothing here knows the server or an engine."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailor.workloads.serving.prompting import ContextDocument

Kind = Literal["chat", "completion"]


# ------------------------------------------------------------------ requests
class _Wire(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class TailorOptions(_Wire):
    """The ``tailor`` extension of a request (``extra_body={"tailor": {...}}`` in the SDK)."""

    variables: dict[str, str] = Field(default_factory=dict, description="Template variables.")
    retrieval: bool = Field(default=True, description="Retrieve context when a KB is set.")
    prompt_profile: dict[str, Any] | None = Field(
        default=None,
        alias="promptProfile",
        description="A profile revision to answer with instead of the served one (what a "
        "PromptProfile's test Job sends to try a revision before it is served).",
    )


class LoraAdapterRequest(_Wire):
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` body."""

    lora_name: str
    lora_path: str | None = None


class ContentPart(_Wire):
    type: str
    text: str | None = None


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class JsonSchemaFormat(_Wire):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatRequest(_Wire):
    """OpenAI's ``response_format``: text, json_object, or json_schema with a schema."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class GenerationParameters(_Wire):
    """What chat and completion requests share: the model and how to sample."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    response_format: ResponseFormatRequest | None = None
    tailor: TailorOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class CompletionRequest(GenerationParameters):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = None
    suffix: str | None = None


class SourceJudgement(_Wire):
    id: str = Field(min_length=1, max_length=200, description="A tailor.sources[].id.")
    useful: bool


class FeedbackRequest(_Wire):
    id: str = Field(min_length=1, max_length=200, description="The response's id.")
    rating: Literal["up", "down"]
    score: int | None = Field(default=None, ge=1, le=5, description="An optional 1-5 scale.")
    correction: str | None = Field(
        default=None, max_length=32768, description="The answer the user wanted."
    )
    sources: list[SourceJudgement] = Field(
        default_factory=list, max_length=64, description="Whether each cited source helped."
    )
    model: str | None = Field(default=None, description="The model, for responses not seen here.")
    comment: str | None = Field(default=None, max_length=4096)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers or {}
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(errors: Sequence[Any]) -> APIError:
    """The 400 of a request body that does not validate (pydantic's errors, first first)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(
            first.get("ctx", {}).get("error", first.get("msg", ""))
        )
        return APIError(400, message, code="invalid_json")
    message = "; ".join(
        f"{_validation_param(e) or 'body'}: {e.get('msg', 'invalid')}" for e in errors
    )
    return APIError(400, message, param=_validation_param(first), code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "json-or-python"}


def _validation_param(error: dict[str, Any]) -> str | None:
    loc = [p for p in error.get("loc", ()) if p != "body"]
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and not part.startswith("function-") and "[" not in part:
            out += ("." if out else "") + part
    return out or None


# ------------------------------------------------------------------ response bodies
@dataclass(frozen=True)
class Reply:
    """The bodies of one response: a chat.completion (``chatcmpl-`` id) or a
    text_completion (``cmpl-``), whole or as chunks, from ``model``."""

    kind: Kind
    model: str
    id: str

    @classmethod
    def new(cls, kind: Kind, model: str) -> Reply:
        # 11 hex digits of the time in ms, then 21 random: a rating finds its exchange
        # (capture.id_time) without an index
        stamp = f"{int(time.time() * 1000):011x}{uuid.uuid4().hex[:21]}"
        return cls(kind, model, ("chatcmpl-" if kind == "chat" else "cmpl-") + stamp)

    def whole(self, result: dict[str, Any], extension: dict[str, Any]) -> dict[str, Any]:
        """The whole answer; ``result`` has its text, finish_reason and usage."""
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": result["text"],
                "finish_reason": result["finish_reason"],
                "logprobs": None,
            }
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
            "usage": result["usage"],
            "system_fingerprint": None,
            "tailor": extension,
        }

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        role: bool = False,
        extension: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One chunk of a stream (``role``: the first, which names the assistant)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [choice],
        }
        if extension:
            body["tailor"] = extension
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage (``stream_options``)."""
        body = self.chunk("", None)
        body["choices"] = []
        body["usage"] = usage
        return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(body: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def source(chunk: ContextDocument) -> dict[str, Any]:
    """A retrieved chunk as the answer's ``tailor.sources`` lists it."""
    return {
        "id": getattr(chunk, "id", None),
        "document_id": getattr(chunk, "document_id", None),
        "title": chunk.title,
        "source": chunk.source,
        "score": getattr(chunk, "score", None),
        "text": chunk.text,
        "metadata": getattr(chunk, "metadata", None) or {},
    }


def model_card(model: str, root: str, created: int) -> dict[str, Any]:
    """A ``/v1/models`` entry: the base model ``root`` or one of its adapters."""
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "tailor",
        "root": root,
        "parent": None if model == root else root,
    }
