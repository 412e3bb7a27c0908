"""Base classes of the Tailor API: camelCase models, cross-field rules and error formatting.

Every spec and status model derives from :class:`TailorModel`: Python attributes are
snake_case, the wire format (YAML, JSON, CRD schema) is camelCase, and unknown fields are
rejected. Cross-field constraints are declared once as :class:`Rule` objects in a model's
``rules`` class variable; the same rule becomes a CEL ``x-kubernetes-validations`` entry in
the generated CRD (enforced by the API server) and a pydantic validator (enforced by
``tailor validate``, builders and workloads), so the two can never disagree about what is
valid. :func:`describe_errors` turns a pydantic error into the lines a user should read:
``spec.lora.r: Input should be greater than 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

RULE_ERROR = "tailor_rule"


@dataclass(frozen=True)
class Rule:
    """A cross-field constraint, written once for both CEL and Python.

    ``cel`` is evaluated by the API server with ``self`` bound to the object the rule is
    declared on (and ``oldSelf`` for transition rules); ``check`` is its Python twin and
    receives the model instance (and the old instance for transition rules). ``field`` is
    the camelCase path, relative to the model, that the message is about; it becomes the
    CEL ``fieldPath`` so the API server's error names the same field as ours.
    """

    cel: str
    message: str
    check: Callable[..., bool]
    field: str = ""
    transition: bool = False

    def to_cel(self) -> dict[str, Any]:
        """The ``x-kubernetes-validations`` entry for this rule."""
        entry: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field:
            entry["fieldPath"] = "." + self.field
            entry["reason"] = "FieldValueInvalid"
        return entry


def exactly_one(model: BaseModel, *fields: str) -> bool:
    """True when exactly one of ``fields`` (snake_case attribute names) is set."""
    return sum(getattr(model, f) is not None for f in fields) == 1


def cel_exactly_one(*fields: str) -> str:
    """The CEL twin of :func:`exactly_one` (``fields`` in camelCase)."""
    members = ", ".join(f"has(self.{f})" for f in fields)
    return f"[{members}].filter(x, x).size() == 1"


class TailorModel(BaseModel):
    """Base of every API model: camelCase on the wire, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_enum_values=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).rules:
            if not rule.transition and not rule.check(self):
                raise PydanticCustomError(
                    RULE_ERROR, "{message}", {"message": rule.message, "field": rule.field}
                )
        return self

    def wire(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def transition_errors(old: TailorModel, new: TailorModel, path: str = "spec") -> list[str]:
    """Messages for transition rules (immutability) that ``new`` breaks relative to ``old``,
    in nested objects too (as the API server checks them: where both sides have one)."""
    errors = []
    for rule in type(new).rules:
        if rule.transition and not rule.check(new, old):
            where = f"{path}.{rule.field}" if rule.field else path
            errors.append(f"{where}: {rule.message}")
    for name, info in type(new).model_fields.items():
        before, after = getattr(old, name, None), getattr(new, name)
        if isinstance(after, TailorModel) and isinstance(before, type(after)):
            errors += transition_errors(before, after, f"{path}.{info.alias or name}")
    return errors


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def describe_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: ``<field path>: <what is wrong>``, the path in camelCase.

    Pydantic adds the name of the union member or of a ``function-after`` wrapper to the
    location; those are dropped so that the path is the one a user wrote in YAML.
    """
    lines = []
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
        if err["type"] == RULE_ERROR:
            field = (err.get("ctx") or {}).get("field", "")
            loc += [p for p in field.split(".") if p]
        path = _location(tuple(loc))
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `kubectl explain`"
        lines.append(f"{path}: {message}" if path else message)
    return lines


def walk(model: Any, path: str = "spec") -> Iterator[tuple[str, BaseModel]]:
    """Every model inside ``model`` (itself included), with its field path in camelCase
    (``spec.sources[0].pvc``): what the operator checks in a spec (Secrets, URLs) finds
    its fields with one walk."""
    if isinstance(model, BaseModel):
        yield path, model
        for name, info in type(model).model_fields.items():
            yield from walk(getattr(model, name), f"{path}.{info.alias or name}")
    elif isinstance(model, list | tuple):
        for index, item in enumerate(model):
            yield from walk(item, f"{path}[{index}]")
