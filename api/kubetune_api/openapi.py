"""pydantic JSON Schema -> a structural OpenAPI v3 schema, as a CustomResourceDefinition needs it.

pydantic writes JSON Schema 2020-12: ``$ref`` to shared definitions, ``anyOf`` with ``null`` for
optional fields, numeric exclusive bounds, ``additionalProperties: false`` for closed models.
The API server wants a structural schema: every node inlined and typed, OpenAPI v3.0 boolean
exclusive bounds, no ``null`` branches, no ``title``. This module makes that translation and
nothing else; what a field means is on the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from .base import CEL_KEY, INT_OR_STRING_KEY, PRESERVE_UNKNOWN_KEY

Schema = dict[str, Any]

#: Keys copied as they are (after the ones handled below).
_PASSED = (
    "type",
    "format",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
)
#: Every JSON Schema key the translation knows; anything else fails `make crds` instead of being
#: dropped (the CRD would then accept what the models refuse).
_KNOWN = {
    *_PASSED,
    "anyOf",
    "const",
    "default",
    "description",
    "title",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    CEL_KEY,
    INT_OR_STRING_KEY,
    PRESERVE_UNKNOWN_KEY,
}
_BOUND_WORDS = {
    "minimum": "at least",
    "exclusiveMinimum": "above",
    "maximum": "at most",
    "exclusiveMaximum": "below",
}


def schema_of(model: type[BaseModel]) -> tuple[Schema, Mapping[str, Schema]]:
    """The model's JSON Schema (wire names) and its shared definitions."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs: Mapping[str, Schema] = schema.pop("$defs", {})
    return schema, defs


def description(text: str | None) -> str | None:
    """Docstrings wrap lines; a CRD description is one paragraph."""
    return " ".join(text.split()) if text else None


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Schema]) -> Schema:
    """Inline a ``$ref`` (the field's own keys win; CEL rules of both are kept) and drop ``null`` branches."""
    out: Schema = dict(node)
    if "$ref" in out:
        target = dict(defs[out.pop("$ref").rsplit("/", 1)[-1]])
        rules = target.get(CEL_KEY, []) + out.get(CEL_KEY, [])
        out = {**target, **out}
        if rules:
            out[CEL_KEY] = rules
    if "anyOf" in out:
        options = [option for option in out["anyOf"] if option.get("type") != "null"]
        if len(options) < len(out["anyOf"]) and out.get("default") is not None:
            # kubectl apply and GitOps tools delete a key set to null, and the default comes back.
            default = out["default"]
            raise ValueError(f"an optional field defaulting to {default!r} can never be unset: drop None")
        if len(options) == 1:
            del out["anyOf"]
            inner = _resolve(options[0], defs)
            rules = inner.get(CEL_KEY, []) + out.get(CEL_KEY, [])
            out = {**inner, **out}
            if rules:
                out[CEL_KEY] = rules
        else:
            out["anyOf"] = options
    if out.get("default", ...) is None:
        del out["default"]
    return out


def _full_default(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An object's default as the API server fills it in: each property's default, nested ones expanded."""
    out: dict[str, Any] = {}
    for key, sub in (schema.get("properties") or {}).items():
        if "default" in sub:
            value = sub["default"]
            out[key] = _full_default(sub) if value == {} and "properties" in sub else value
    return out


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _object_default(default: dict[str, Any], schema: Schema, path: str) -> dict[str, Any]:
    """``{}`` (the API server fills in the fields' defaults), or the whole default where CEL must see it.

    The API server checks an object's CEL rules against its default as written, without filling
    the fields' defaults in first; ``{}`` would fail a rule such as ``self.evalStrategy != 'steps'``.
    """
    full = _full_default(schema)
    if _without_none(default) != full:
        raise ValueError(f"{path}: an object default must be its fields' defaults, got {default}")
    checks_values = any("oldSelf" not in rule["rule"] for rule in schema.get(CEL_KEY, []))
    return full if checks_values else {}


def _bounds(node: Mapping[str, Any], path: str) -> tuple[Schema, list[dict[str, str]]]:
    """OpenAPI v3.0 bounds; a fractional bound becomes a CEL rule instead.

    (The OpenAPI validator compares whole-number values, such as a default of 0, against an
    integer-truncated bound: ``maximum: 0.5`` would refuse nothing below 1.)
    """
    out: Schema = {}
    rules: list[dict[str, str]] = []
    for key, word in _BOUND_WORDS.items():
        if key not in node:
            continue
        bound = node[key]
        if isinstance(bound, float) and not bound.is_integer():
            op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[key]
            rules.append({"rule": f"self {op} {bound}", "message": f"{path} must be {word} {bound}"})
            continue
        value = int(bound) if isinstance(bound, float) else bound
        if key.startswith("exclusive"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    return out, rules


def structural(node: Mapping[str, Any], defs: Mapping[str, Schema], path: str) -> Schema:
    """The structural schema of one JSON Schema node; ``path`` (dotted, wire names) names it in messages."""
    src = _resolve(node, defs)
    unknown = set(src) - _KNOWN
    if unknown:
        raise ValueError(f"{path}: JSON Schema keys the CRD translation does not know: {sorted(unknown)}")
    if src.get("additionalProperties") is True and not src.get(PRESERVE_UNKNOWN_KEY):
        raise ValueError(
            f"{path}: a free-form object would be pruned by the API server; mark it {PRESERVE_UNKNOWN_KEY}"
        )
    out: Schema = {}
    if src.get(INT_OR_STRING_KEY):
        out.update(anyOf=[{"type": "integer"}, {"type": "string"}], **{INT_OR_STRING_KEY: True})
        src = {k: v for k, v in src.items() if k not in ("anyOf", "type")}
    elif "anyOf" in src and src.get(PRESERVE_UNKNOWN_KEY):
        # Any JSON value (a sweep's choices: numbers, strings, booleans): no type, kept as written.
        src = {k: v for k, v in src.items() if k not in ("anyOf", "type")}
    elif "anyOf" in src:
        raise ValueError(f"{path}: a union the CRD cannot express: {src['anyOf']}")
    if "const" in src:
        out["type"] = src.get("type", "string")
        out["enum"] = [src["const"]]
    for key in _PASSED:
        if key in src and key not in out:
            out[key] = src[key]
    bounds, bound_rules = _bounds(src, path)
    out.update(bounds)
    text = description(src.get("description"))
    if text:
        out["description"] = text
    if src.get(PRESERVE_UNKNOWN_KEY):
        out[PRESERVE_UNKNOWN_KEY] = True
    elif "properties" in src:
        out["properties"] = {
            key: structural(sub, defs, f"{path}.{key}" if path else key)
            for key, sub in src["properties"].items()
        }
        if src.get("required"):
            out["required"] = list(src["required"])
    elif isinstance(src.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(src["additionalProperties"], defs, f"{path}{{}}")
    if isinstance(src.get("items"), dict):
        out["items"] = structural(src["items"], defs, f"{path}[]")
    rules = [rule_ordered(rule) for rule in src.get(CEL_KEY, [])] + bound_rules
    if rules:
        out[CEL_KEY] = rules
    if "default" in src:
        default = src["default"]
        is_object = isinstance(default, dict) and "properties" in out
        out["default"] = _object_default(default, out, path) if is_object else default
    return _ordered(out)


def rule_ordered(rule: Mapping[str, str]) -> dict[str, str]:
    return {key: rule[key] for key in ("rule", "message", "fieldPath") if key in rule}


#: Key order in the generated YAML, for people reading it: what it is, then its limits, then its parts.
_ORDER = (
    "type",
    "anyOf",
    INT_OR_STRING_KEY,
    "format",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "pattern",
    "default",
    "description",
    PRESERVE_UNKNOWN_KEY,
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    CEL_KEY,
    "properties",
    "additionalProperties",
    "items",
)


def _ordered(schema: Schema) -> Schema:
    return {key: schema[key] for key in _ORDER if key in schema}
