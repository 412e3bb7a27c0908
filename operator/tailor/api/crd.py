"""Generate CustomResourceDefinitions from the API models.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema:
no ``$ref`` (every definition is inlined), ``nullable: true`` instead of ``null`` in a
union, boolean ``exclusiveMinimum``, ``x-kubernetes-int-or-string`` for quantities and
``x-kubernetes-preserve-unknown-fields`` only on really free-form objects. Each model's
:class:`~tailor.api.base.Rule` objects become ``x-kubernetes-validations`` (CEL) on the
node of that model, so the API server enforces the same cross-field rules as pydantic.
"""

from __future__ import annotations

from typing import Any

from tailor.api import API_VERSION, CATEGORY, GROUP, KINDS, VERSION, Kind
from tailor.api.base import TailorModel

DROP_KEYS = {"title", "$defs", "additionalProperties_", "examples"}


def _rules_by_title(model: type[TailorModel]) -> dict[str, list[dict[str, Any]]]:
    """CEL rules of every model reachable from ``model``, keyed by the schema title."""
    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[type] = set()

    def visit(cls: type) -> None:
        if cls in seen or not (isinstance(cls, type) and issubclass(cls, TailorModel)):
            return
        seen.add(cls)
        if cls.rules:
            out[cls.__name__] = [r.to_cel() for r in cls.rules]
        for field in cls.model_fields.values():
            for candidate in _types_in(field.annotation):
                visit(candidate)

    visit(model)
    return out


def _types_in(annotation: Any) -> list[type]:
    args = getattr(annotation, "__args__", None)
    if args:
        found: list[type] = []
        for a in args:
            found += _types_in(a)
        return found
    return [annotation] if isinstance(annotation, type) else []


def _structural(node: Any, defs: dict[str, Any], rules: dict[str, list[dict[str, Any]]]) -> Any:
    """Rewrite one JSON-schema node (recursively) into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_structural(n, defs, rules) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        merged["title"] = name
        return _structural(merged, defs, rules)
    for union in ("anyOf", "oneOf"):
        if union in node:
            members = [m for m in node[union] if m.get("type") != "null"]
            nullable = len(members) < len(node[union])
            rest = {k: v for k, v in node.items() if k != union}
            out: dict[str, Any]
            if len(members) == 1:
                merged = {**members[0], **{k: v for k, v in rest.items() if k != "default"}}
                if "$ref" in members[0]:
                    merged = {**_structural(members[0], defs, rules), **rest}
                if rest.get("default") is not None:
                    merged["default"] = rest["default"]
                out = _structural(merged, defs, rules)
            elif all(m.get("type") in ("integer", "string") for m in members) and rest.get(
                "x-kubernetes-int-or-string"
            ):
                out = _structural(rest, defs, rules)
            else:
                raise ValueError(f"cannot express union {node[union]} structurally")
            if nullable:
                out["nullable"] = True
                out.pop("default", None) if out.get("default") is None else None
            return out
    out = {}
    title = node.get("title")
    for key, value in node.items():
        if key in DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, rules) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs, rules)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and out.get("additionalProperties") is False:
        del out["additionalProperties"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" in out:
        del out["additionalProperties"]
    if title in rules and out.get("type") == "object":
        out["x-kubernetes-validations"] = rules[title]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
    return out


def openapi_schema(model: type[TailorModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model, CEL rules included."""
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.get("$defs", {})
    rules = _rules_by_title(model)
    schema: dict[str, Any] = _structural(raw, defs, rules)
    return schema


def build_crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    spec_schema = openapi_schema(kind.spec)
    status_schema = openapi_schema(kind.status)
    status_schema["description"] = f"Observed state of the {kind.kind}, written by Tailor."
    spec_schema["description"] = f"Desired state of the {kind.kind}."
    schema = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "tailor.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind.kind},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    columns = [
        {
            "name": c.name,
            "type": c.type,
            "jsonPath": c.json_path,
            **({"description": c.description} if c.description else {}),
            **({"priority": c.priority} if c.priority else {}),
        }
        for c in kind.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "tailor"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name (``<kind>.yaml``) to CRD, for every kind."""
    return {f"{k.singular}.yaml": build_crd(k) for k in KINDS.values()}


__all__ = ["API_VERSION", "all_crds", "build_crd", "openapi_schema"]
