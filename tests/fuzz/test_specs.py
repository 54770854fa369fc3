"""Fuzzing the spec -> trainer config -> Job path (no cluster).

For any spec a user might write (strategies in :mod:`specs`), the API models either accept it or
refuse it with a ValidationError, never another exception; every refusal reads as
``path: message`` naming a real field in words, not a regular expression or a Python type; and
every accepted spec builds its children, whose config.json the trainer parses back into the very
config the operator meant, and whose objects are plain JSON.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, get_args, get_origin

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune_api import coordinates, wellknown
from kubetune_api.base import RULE_ERROR, ApiModel, field_errors
from kubetune_api.spec import FineTuneJobSpec
from kubetune_api.trainer import ReportingSpec, TrainerConfig
from kubetune_operator import builders
from kubetune_trainer.__main__ import _load_config

from .budget import examples
from .specs import FTJ_NAMES, Json, specs

DEFAULT_IMAGE = "registry.example/t:1"
NAMESPACE = "team-a"
EGRESS: dict[str, list[dict[str, Any]]] = {
    "dns": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
    "hub": [{"ports": [{"port": 443}]}],
}
MINIMAL = {
    "model": {"source": "s3://models/base"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run"},
}

#: Words that mean a message was written for Python programmers, or is a regular expression.
UNCLEAR = (
    "should match pattern",
    "instance of",
    "valid tuple",
    "valid dictionary",
    "[type=",
    "pydantic",
    "Value error",
    "Assertion failed",
    "function-after",
    "NoneType",
)


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def names_a_field(tp: Any, parts: list[str | int]) -> bool:
    """Whether ``parts`` (an error's loc) is a path through the API's types (a field, an item, a key)."""
    tp = _unwrap(tp)
    if not parts:
        return True
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(names_a_field(m, parts) for m in get_args(tp) if m is not type(None))
    head, rest = parts[0], parts[1:]
    if isinstance(tp, type) and issubclass(tp, ApiModel):
        for name, info in tp.model_fields.items():
            if head in (name, info.alias):
                return names_a_field(info.annotation, rest)
        return False
    if get_origin(tp) is tuple:
        return isinstance(head, int) and names_a_field(get_args(tp)[0], rest)
    if get_origin(tp) is dict:
        return isinstance(head, str) and names_a_field(get_args(tp)[1], rest)
    return False


def unclear_refusals(err: ValidationError) -> list[str]:
    """The lines of a refusal that do not name a real field, or do not say what is wrong in words."""
    bad = []
    for item, line in zip(err.errors(), field_errors(err), strict=True):
        loc: list[str | int] = list(item["loc"])
        if item["type"] == RULE_ERROR:
            field_path = str((item.get("ctx") or {}).get("field_path", ""))
            loc += [part for part in field_path.split(".") if part]
        rendered_path = bool(loc)
        if item["type"] == "extra_forbidden":  # the unknown key itself is not a field: its parent is
            loc = loc[:-1]
        if not names_a_field(FineTuneJobSpec, loc):
            bad.append(f"path names no field: {line}")
        # A map key in the path ("podLabels[a b]") is the user's own text: it may hold spaces.
        elif rendered_path and not re.match(r"^\S+: \S", re.sub(r"\[[^\]]*\]", "[key]", line)):
            bad.append(f"not 'path: message': {line}")
        elif not rendered_path and item["type"] != "model_type":  # only "the spec must be an object"
            bad.append(f"no path: {line}")
        if any(words in line for words in UNCLEAR) or len(line.splitlines()) != 1:
            bad.append(f"unclear message: {line}")
    return bad


def check_children(spec: FineTuneJobSpec, raw: Json, name: str, egress: bool) -> None:
    """The accepted spec's children build; the trainer parses their config back unchanged; all is JSON."""
    ftj = {
        "apiVersion": coordinates.API_VERSION,
        "kind": coordinates.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": "0b1c2d3e-0000-4000-8000-000000000001"},
        "spec": raw,
    }
    objects = builders.children(ftj, DEFAULT_IMAGE, EGRESS if egress else None)
    json.dumps(objects, allow_nan=False)  # what the API client sends
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (job,) = [o for o in objects if o["kind"] == "Job"]
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / wellknown.CONFIG_KEY
        path.write_text(config_map["data"][wellknown.CONFIG_KEY], encoding="utf-8")
        parsed = _load_config(str(path))  # the trainer's own parse (InvalidConfigError if refused)
    reporting = ReportingSpec(namespace=NAMESPACE, name=name, uid=ftj["metadata"]["uid"])
    assert parsed == TrainerConfig.from_spec(spec, reporting)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == (spec.image or DEFAULT_IMAGE)


@settings(max_examples=examples(500))
@given(raw=specs(), name=FTJ_NAMES, egress=st.booleans())
@example(raw={**MINIMAL, "resources": {"scratch": "1e1.5"}}, name="x", egress=False)
@example(raw={**MINIMAL, "resources": {"scratch": "1E1000000"}}, name="x", egress=False)
@example(raw={**MINIMAL, "resources": {"memory": True}}, name="x", egress=False)
@example(raw={**MINIMAL, "resources": {"cpu": []}}, name="x", egress=False)
@example(raw={**MINIMAL, "dataset": {"train": "S3://data/train.jsonl"}}, name="x", egress=False)
@example(raw={**MINIMAL, "scheduling": {"queueName": "Team_A"}}, name="x", egress=False)
@example(raw={**MINIMAL, "storage": {"endpoint": "minio:9000"}}, name="x", egress=False)
@example(raw={**MINIMAL, "resources": {"gpuResourceName": "nvidia.com/GPU"}}, name="x", egress=False)
@example(raw={**MINIMAL, "lora": {"targetModules": "q_proj"}}, name="x", egress=False)
@example(raw={**MINIMAL, "output": "s3://out/run"}, name="x", egress=False)
@example(raw={**MINIMAL, "training": {"weightDecay": math.inf}}, name="x", egress=False)
@example(raw={**MINIMAL, "training": {"seed": 2**32}}, name="x", egress=False)
@example(raw={**MINIMAL, "lifecycle": {"ttlSecondsAfterFinished": 2**31}}, name="x", egress=False)
@example(raw={**MINIMAL, "identity": {"serviceAccountAnnotations": {"a b": "x"}}}, name="x", egress=False)
@example(
    raw={**MINIMAL, "model": {"source": "a/b", "tokenSecretRef": {"name": "hf", "key": "a b"}}},
    name="x",
    egress=False,
)
@example(raw={**MINIMAL, "resources": {"gpus": 1, "gpuResourceName": "gpu"}}, name="x", egress=False)
@example(raw={**MINIMAL, "lora": None, "method": None}, name="x", egress=False)
def test_a_spec_is_refused_in_words_or_runs_as_written(raw: Json, name: str, egress: bool) -> None:
    try:
        spec = FineTuneJobSpec.model_validate(raw)
    except ValidationError as err:
        refused = err
    else:
        event("accepted")
        check_children(spec, raw, name, egress)
        return
    event("refused")
    assert unclear_refusals(refused) == []


def test_a_null_is_unset_as_the_api_server_reads_it() -> None:
    """The API server prunes a null for a field that cannot be null, then defaults it (found by
    test_specs_apiserver: ``lora: null`` was stored, and refused by the models)."""
    spec = FineTuneJobSpec.model_validate({**MINIMAL, "lora": None, "method": None, "suspend": None})
    assert spec == FineTuneJobSpec.model_validate(MINIMAL)
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate({**MINIMAL, "model": None})
    assert field_errors(caught.value) == ["model: Field required"]
    # Only a field's wire name: a null under an unknown key is still an unknown field (big run).
    output = {"uri": "s3://out/run", "mergeAdapter": False, "merge_adapter": None}
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate({**MINIMAL, "output": output}, by_name=False)
    assert field_errors(caught.value) == ["output.merge_adapter: Extra inputs are not permitted"]


def test_the_trainer_can_seed_with_the_largest_seed_the_api_takes() -> None:
    import numpy as np

    seed = FineTuneJobSpec.model_fields["training"].annotation.model_fields["seed"]  # type: ignore[union-attr]
    largest = next(m.le for m in seed.metadata if hasattr(m, "le"))
    np.random.seed(largest)  # what transformers' set_seed does first
    with pytest.raises(ValueError, match="between 0 and 2\\*\\*32 - 1"):
        np.random.seed(largest + 1)


def test_names_a_field_knows_real_paths_from_made_up_ones() -> None:
    assert names_a_field(FineTuneJobSpec, ["scheduling", "tolerations", 3, "operator"])
    assert names_a_field(FineTuneJobSpec, ["scheduling", "nodeSelector", "a b"])
    assert names_a_field(FineTuneJobSpec, ["resources", "cpu"])
    assert not names_a_field(FineTuneJobSpec, ["resources", "cpu", "int"])
    assert not names_a_field(FineTuneJobSpec, ["resources", "cpus"])
    assert not names_a_field(FineTuneJobSpec, ["lora", "targetModules", "x"])


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"resources": {"scratch": "1e1.5"}}, "must be a Kubernetes quantity"),
        ({"resources": {"memory": True}}, "must be a Kubernetes quantity"),
        ({"resources": {"cpu": [1]}}, "must be a Kubernetes quantity"),
        ({"dataset": {"train": "S3://data/x.jsonl"}}, "must be an s3://bucket/key URI"),
        ({"scheduling": {"queueName": "Team_A"}}, "must be a name of lower-case letters"),
        ({"identity": {"serviceAccountName": "a..b"}}, "must be a name of lower-case letters"),
        ({"resources": {"gpuResourceName": "a..b/gpu"}}, "must be an extended resource name"),
        ({"storage": {"endpoint": "minio:9000"}}, "must be an http:// or https:// URL"),
        ({"resources": {"gpuResourceName": "GPU"}}, "must be an extended resource name"),
        ({"lora": {"targetModules": "q_proj"}}, "must be a list"),
        ({"output": "s3://out/run"}, "must be an object"),
        ({"training": {"weightDecay": math.inf}}, "finite number"),
        ({"training": {"seed": 2**32}}, "less than or equal to 4294967295"),
        ({"lifecycle": {"ttlSecondsAfterFinished": 2**31}}, "less than or equal to 2147483647"),
        ({"training": {"saveSteps": 2**63}}, "must be at most 9223372036854775807"),
        ({"identity": {"serviceAccountAnnotations": {"a b": "x"}}}, "keys must be annotation keys"),
        (
            {"storage": {"credentialsSecretRef": {"name": "s3", "accessKeyIdKey": "a/b"}}},
            "must be a key of a Secret",
        ),
        ({"resources": {"gpuResourceName": "gpu"}}, "must be an extended resource name"),
        ({"resources": {"gpuResourceName": "requests.x.io/gpu"}}, "must be an extended resource name"),
    ],
)
def test_refusals_found_by_fuzzing_say_what_to_write(raw: Json, words: str) -> None:
    spec = {**MINIMAL, **raw}
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(spec)
    (line,) = field_errors(caught.value)
    assert words in line
    assert re.match(r"^[a-zA-Z.]+: ", line), line
