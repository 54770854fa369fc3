"""The CRD file itself: one document, documented everywhere, and in step with the trainer's config.

The trainer's config schema (pydantic, ``kubetune_trainer.config``) is the source of truth for
every field the two share: enums, defaults and bounds are compared here, field by field, so a
change on either side fails this test until the other follows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator import names, status
from kubetune_trainer.config import TrainerConfig

Obj = dict[str, Any]
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"

#: CRD spec section -> TrainerConfig section (same camelCase field names inside).
SHARED_SECTIONS = {
    "model": "model",
    "dataset": "dataset",
    "quantization": "quantization",
    "lora": "lora",
    "training": "training",
    "output": "output",
    "storage": "storage",
}
#: Config fields the operator fills in itself (not user-facing in the CRD).
CONFIG_ONLY = {"model.tokenEnv", "reporting", "gpus", "workDir"}
#: CRD fields the trainer never sees (they become env vars, pod fields or Job fields).
CRD_ONLY = {"model.tokenSecretRef", "storage.credentialsSecretRef"}
#: Deliberate default differences, with the reason.
DEFAULT_EXCEPTIONS = {
    # The config's 0 means "CPU"; a FineTuneJob is a GPU job unless it says otherwise.
    "resources.gpus",
}
PROGRESS_FIELDS = {
    "step",
    "totalSteps",
    "epoch",
    "loss",
    "evalLoss",
    "learningRate",
    "tokensPerSecond",
    "etaSeconds",
    "lastCheckpoint",
    "updateTime",
}


def _version(crd: Obj) -> Obj:
    versions: list[Obj] = crd["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def _spec_schema(crd: Obj) -> Obj:
    schema: Obj = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def _config_schema() -> tuple[Obj, Obj]:
    schema = TrainerConfig.model_json_schema(by_alias=True)
    return schema, schema["$defs"]


def _resolve(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> Obj:
    """Follow $ref and unwrap ``X | None`` (anyOf with null) into X's schema plus the default."""
    out: Obj = dict(prop)
    if "$ref" in out:
        out = {**defs[out.pop("$ref").split("/")[-1]], **out}
    if "anyOf" in out:
        options = [o for o in out.pop("anyOf") if o.get("type") != "null"]
        assert len(options) == 1, prop
        out = {**_resolve(options[0], defs), **out}
    return out


def _bounds(schema: Mapping[str, Any], *, openapi: bool) -> tuple[Any, bool, Any, bool]:
    """(minimum, exclusive?, maximum, exclusive?) in either OpenAPI v3.0 or JSON Schema 2020 style."""
    if openapi:
        high, high_excl = schema.get("maximum"), bool(schema.get("exclusiveMaximum"))
        for rule in schema.get("x-kubernetes-validations", []):
            # A CEL upper bound such as "self < 0.5" (see dataset.validationSplit in the CRD).
            match = re.fullmatch(r"self (<=?) ([0-9.]+)", rule["rule"])
            if match:
                high, high_excl = float(match[2]), match[1] == "<"
        return schema.get("minimum"), bool(schema.get("exclusiveMinimum")), high, high_excl
    low, low_excl = schema.get("minimum"), False
    if "exclusiveMinimum" in schema:
        low, low_excl = schema["exclusiveMinimum"], True
    high, high_excl = schema.get("maximum"), False
    if "exclusiveMaximum" in schema:
        high, high_excl = schema["exclusiveMaximum"], True
    return low, low_excl, high, high_excl


def _expanded_default(schema: Mapping[str, Any]) -> Any:
    """The field's default as the API server stores it (an object default gets its fields' defaults)."""
    default = schema.get("default")
    if isinstance(default, dict):
        default = dict(default)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in default and "default" in sub:
                default[key] = _expanded_default(sub)
    return default


def _shared_fields() -> Iterator[tuple[str, Obj, Obj]]:
    """(dotted path, CRD schema, config schema) for every field both sides define."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    spec = _spec_schema(crd)
    config, defs = _config_schema()
    for crd_key, config_key in SHARED_SECTIONS.items():
        crd_section = spec["properties"][crd_key]
        config_section = _resolve(config["properties"][config_key], defs)
        for field, crd_field in crd_section["properties"].items():
            if field in config_section["properties"]:
                yield f"{crd_key}.{field}", crd_field, _resolve(config_section["properties"][field], defs)
    yield "method", spec["properties"]["method"], _resolve(config["properties"]["method"], defs)
    yield (
        "resources.gpus",
        spec["properties"]["resources"]["properties"]["gpus"],
        config["properties"]["gpus"],
    )


SHARED = list(_shared_fields())


def test_crd_is_a_single_plain_document() -> None:
    documents = list(yaml.safe_load_all(CRD_PATH.read_text()))
    assert len(documents) == 1
    crd = documents[0]
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert crd["spec"]["names"]["kind"] == names.KIND
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert _version(crd)["name"] == names.VERSION
    assert _version(crd)["subresources"] == {"status": {}}


def test_every_config_field_is_in_the_crd_and_back(crd: Obj) -> None:
    spec = _spec_schema(crd)
    config, defs = _config_schema()
    missing_in_crd, missing_in_config = [], []
    for crd_key, config_key in SHARED_SECTIONS.items():
        crd_fields = set(spec["properties"][crd_key]["properties"])
        config_fields = set(_resolve(config["properties"][config_key], defs)["properties"])
        missing_in_crd += [
            f"{crd_key}.{f}" for f in config_fields - crd_fields if f"{crd_key}.{f}" not in CONFIG_ONLY
        ]
        missing_in_config += [
            f"{crd_key}.{f}" for f in crd_fields - config_fields if f"{crd_key}.{f}" not in CRD_ONLY
        ]
    top_level = set(config["properties"]) - set(SHARED_SECTIONS) - {"method"} - CONFIG_ONLY
    assert not missing_in_crd, f"trainer config fields without a CRD field: {missing_in_crd}"
    assert not missing_in_config, f"CRD fields the trainer config does not accept: {missing_in_config}"
    assert not top_level, f"new top-level trainer config sections: {top_level}"


@pytest.mark.parametrize(("path", "crd_field", "config_field"), SHARED, ids=[p for p, _, _ in SHARED])
def test_shared_field_matches_the_trainer_config(path: str, crd_field: Obj, config_field: Obj) -> None:
    if "enum" in config_field or "const" in config_field:
        expected = config_field.get("enum", [config_field.get("const")])
        assert crd_field.get("enum") == expected, f"{path}: enum"
    # Where the trainer has a bound the API has the same one; the API may add upper bounds of its
    # own (sanity limits that also keep CEL cost estimates small).
    crd_low, crd_low_excl, crd_high, crd_high_excl = _bounds(crd_field, openapi=True)
    low, low_excl, high, high_excl = _bounds(config_field, openapi=False)
    assert (crd_low, crd_low_excl) == (low, low_excl), f"{path}: lower bound"
    if high is not None:
        assert (crd_high, crd_high_excl) == (high, high_excl), f"{path}: upper bound"
    if "pattern" in config_field:
        assert crd_field.get("pattern") == config_field["pattern"], f"{path}: pattern"
    if config_field.get("default") is not None and path not in DEFAULT_EXCEPTIONS:
        assert _expanded_default(crd_field) == config_field["default"], f"{path}: default"
    if "minLength" in config_field:
        assert crd_field.get("minLength") == config_field["minLength"], f"{path}: minLength"
    if "minItems" in config_field:
        assert crd_field.get("minItems") == config_field["minItems"], f"{path}: minItems"


def _walk(schema: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description(crd: Obj) -> None:
    root = _version(crd)["schema"]["openAPIV3Schema"]
    undocumented = [
        path
        for path, schema in _walk(root, "")
        if path not in ("", ".metadata") and not path.endswith(("[]", "{}")) and not schema.get("description")
    ]
    assert not undocumented, f"fields without a description: {undocumented}"


def test_every_cel_rule_has_a_message(crd: Obj) -> None:
    root = _version(crd)["schema"]["openAPIV3Schema"]
    rules = [
        (path, rule)
        for path, schema in _walk(root, "")
        for rule in schema.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 15
    for path, rule in rules:
        assert rule.get("message"), f"{path}: rule {rule['rule']!r} has no message"


def test_status_contract(crd: Obj) -> None:
    props = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(props["progress"]["properties"]) == PROGRESS_FIELDS
    assert props["phase"]["enum"] == list(status.PHASES)
    assert set(status.OWNED_KEYS) <= set(props)
    conditions = props["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_printer_columns(crd: Obj) -> None:
    columns = {c["name"]: c for c in _version(crd)["additionalPrinterColumns"]}
    assert [name for name, c in columns.items() if not c.get("priority")] == [
        "Phase",
        "Progress",
        "Loss",
        "Age",
    ]
    assert columns["Output"]["priority"] == 1
    assert columns["Output"]["jsonPath"] == ".status.outputURI"
