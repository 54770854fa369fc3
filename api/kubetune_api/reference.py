"""docs/api.md, generated from the same structural schema as the CRD, plus the reasons and exit codes.

A table per spec section (type, default, bounds, description), the rules the API server applies,
the status fields, the phases and every condition reason. ``make crds`` writes it; a test fails
when the committed file differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from . import coordinates
from .crd import finetunejob_crd, finetunesweep_crd
from .exitcodes import ExitCode
from .reasons import EXIT_CODE_REASONS, PHASE_MEANINGS, ConditionType, Reason
from .sweep_reasons import SWEEP_PHASE_MEANINGS, TRIAL_STATE_MEANINGS, SweepConditionType, SweepReason

REFERENCE_FILE = "docs/api.md"
Schema = Mapping[str, Any]


def _type(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type(schema['additionalProperties'])}"
    if kind == "object" and schema.get("x-kubernetes-preserve-unknown-fields"):
        return "object (passed through)"
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return kind


def _value(value: Any) -> str:
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _limits(schema: Schema) -> str:
    parts: list[str] = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(_value(v) for v in schema["enum"]))
    if "minimum" in schema:
        parts.append(f"{'>' if schema.get('exclusiveMinimum') else '≥'} {schema['minimum']}")
    if "maximum" in schema:
        parts.append(f"{'<' if schema.get('exclusiveMaximum') else '≤'} {schema['maximum']}")
    for key, word in (("minLength", "chars ≥"), ("maxLength", "chars ≤"), ("minItems", "items ≥")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    for key, word in (("maxItems", "items ≤"), ("maxProperties", "entries ≤")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    for rule in schema.get("x-kubernetes-validations", []):
        if rule["rule"].startswith("self ") and "oldSelf" not in rule["rule"]:
            parts.append(f"`{rule['rule']}`")
    if "required" in schema and "properties" not in schema:
        parts.append("required")
    return "; ".join(parts).replace("|", "\\|")


def _rows(schema: Schema, prefix: str, required: bool) -> Iterator[tuple[str, Schema, bool]]:
    """(dotted name, schema, required) for a field and, for plain objects, each field inside it."""
    yield prefix, schema, required
    if schema.get("type") == "object" and "properties" in schema:
        needed = set(schema.get("required", []))
        for key, sub in schema["properties"].items():
            yield from _rows(sub, f"{prefix}.{key}", key in needed)
    items = schema.get("items")
    if isinstance(items, Mapping) and "properties" in items:
        needed = set(items.get("required", []))
        for key, sub in items["properties"].items():
            yield from _rows(sub, f"{prefix}[].{key}", key in needed)


def _table(rows: Iterator[tuple[str, Schema, bool]]) -> list[str]:
    lines = ["| field | type | default | limits | description |", "|---|---|---|---|---|"]
    for name, schema, required in rows:
        default = _value(schema["default"]) if "default" in schema else ("**required**" if required else "")
        description = str(schema.get("description", "")).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type(schema)} | {default} | {_limits(schema)} | {description} |")
    return lines


def _rules(schema: Schema, where: str) -> list[str]:
    """The object-level CEL rules of a section, as the messages a user sees."""
    lines = []
    for rule in schema.get("x-kubernetes-validations", []):
        if rule["rule"] == "self == oldSelf":
            continue
        field = f" (`{where}{rule['fieldPath']}`)" if "fieldPath" in rule else ""
        lines.append(f"- {rule['message']}{field}: `{rule['rule']}`")
    return lines


def _spec_sections(spec: Schema) -> list[str]:
    out: list[str] = []
    needed = set(spec.get("required", []))
    top = [
        (k, s) for k, s in spec["properties"].items() if s.get("type") != "object" or "properties" not in s
    ]
    out += ["### spec (top-level fields)", "", *_table((f"spec.{k}", s, k in needed) for k, s in top), ""]
    out += ["Rules across sections:", "", *_rules(spec, "spec"), ""]
    for key, section in spec["properties"].items():
        if section.get("type") != "object" or "properties" not in section:
            continue
        immutable = any(r["rule"] == "self == oldSelf" for r in section.get("x-kubernetes-validations", []))
        out += [f"### spec.{key}", "", str(section.get("description", "")), ""]
        if immutable:
            out += ["Immutable once the FineTuneJob is created.", ""]
        inner = section.get("required", [])
        rows = (
            row
            for field, sub in section["properties"].items()
            for row in _rows(sub, f"{key}.{field}", field in inner)
        )
        out += [*_table(rows), ""]
        rules = _rules(section, f"spec.{key}")
        if rules:
            out += ["Rules:", "", *rules, ""]
    return out


def _status(status: Schema) -> list[str]:
    rows = (row for key, sub in status["properties"].items() for row in _rows(sub, f"status.{key}", False))
    return ["## status", "", str(status.get("description", "")), "", *_table(rows), ""]


def _reasons() -> list[str]:
    lines = [
        "## Phases",
        "",
        "| phase | meaning |",
        "|---|---|",
        *(f"| `{phase}` | {meaning} |" for phase, meaning in PHASE_MEANINGS.items()),
        "",
        "Condition types, in order: " + ", ".join(f"`{c}`" for c in ConditionType) + ".",
        "",
        "## Reasons",
        "",
        "`status.reason`, the conditions' reasons and the Events' messages. A warning is posted as a",
        "`Warning` Event and shown as Degraded by the Argo CD health check. Reasons from the kubelet,",
        "the scheduler or the Job controller that are not listed reach status unchanged.",
        "",
        "| reason | phase | warning | meaning |",
        "|---|---|---|---|",
    ]
    for reason in Reason:
        phases = ", ".join(reason.phases) or "(condition)"
        lines.append(f"| `{reason}` | {phases} | {'yes' if reason.warning else ''} | {reason.meaning} |")
    lines += [
        "",
        "## Trainer exit codes",
        "",
        "A retry cannot help these: the Job fails at once (podFailurePolicy `FailJob`).",
        "",
        "| code | reason | meaning |",
        "|---|---|---|",
        *(f"| {int(code)} | `{EXIT_CODE_REASONS[code]}` | {code.meaning} |" for code in ExitCode),
        "",
    ]
    return lines


def api_reference() -> str:
    """The whole of docs/api.md."""
    schema = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        f"# FineTuneJob API reference (`{coordinates.API_VERSION}`)",
        "",
        "<!-- GENERATED by `make crds` from api/kubetune_api/; do not edit. -->",
        "",
        str(schema["description"]),
        "",
        "The API server applies every default, bound and rule below (OpenAPI schema and CEL) before the",
        "operator sees a FineTuneJob; the same models validate in Python (`kubetune_api.FineTuneJob`).",
        "",
        "Name rules: " + "; ".join(rule["message"] for rule in schema["x-kubernetes-validations"]) + ".",
        "",
        "## spec",
        "",
        *_spec_sections(schema["properties"]["spec"]),
        *_status(schema["properties"]["status"]),
        *_reasons(),
        *_sweep_reference(),
    ]
    return "\n".join(lines)


def _sweep_reference() -> list[str]:
    """The FineTuneSweep's part of docs/api.md: its spec, status, phases, trial states and reasons."""
    from . import sweep

    schema = finetunesweep_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    needed = set(spec.get("required", []))
    rows = (
        row
        for key, sub in spec["properties"].items()
        if key != "template"
        for row in _rows(sub, f"spec.{key}", key in needed)
    )
    status_rows = (
        row
        for key, sub in schema["properties"]["status"]["properties"].items()
        for row in _rows(sub, f"status.{key}", False)
    )
    searchable = ", ".join(f"`{path}`" for path in sweep.SWEEPABLE)
    return [
        "",
        f"# FineTuneSweep API reference (`{coordinates.API_VERSION}`)",
        "",
        str(schema["description"]),
        "",
        "Name rules: " + "; ".join(rule["message"] for rule in schema["x-kubernetes-validations"]) + ".",
        "",
        "## spec",
        "",
        "`spec.template` is a FineTuneJob spec (see above), with every rule of one; each trial's",
        "FineTuneJob is the template with the searched paths set, named `<sweep>-<trial number>`, writing",
        "under `<template.output.uri>/<trial name>`.",
        "",
        *_table(rows),
        "",
        "Rules:",
        "",
        *_rules(spec, "spec"),
        *_rules(spec["properties"]["searchSpace"]["items"], "spec.searchSpace[]"),
        "",
        f"Searchable paths: {searchable}.",
        "",
        "## status",
        "",
        str(schema["properties"]["status"].get("description", "")),
        "",
        *_table(status_rows),
        "",
        *_sweep_states_reference(),
    ]


def _sweep_states_reference() -> list[str]:
    """The sweep's phases, trial states, condition types and reasons, as tables."""
    return [
        "## Sweep phases",
        "",
        "| phase | meaning |",
        "|---|---|",
        *(f"| `{phase}` | {meaning} |" for phase, meaning in SWEEP_PHASE_MEANINGS.items()),
        "",
        "## Trial states",
        "",
        "| state | meaning |",
        "|---|---|",
        *(f"| `{state}` | {meaning} |" for state, meaning in TRIAL_STATE_MEANINGS.items()),
        "",
        "Condition types, in order: " + ", ".join(f"`{c}`" for c in SweepConditionType) + ".",
        "",
        "## Sweep reasons",
        "",
        "| reason | warning | meaning |",
        "|---|---|---|",
        *(f"| `{r}` | {'yes' if r.warning else ''} | {r.meaning} |" for r in SweepReason),
        "",
    ]
