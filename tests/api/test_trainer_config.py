"""The trainer config between versions: what the operator writes, and what an older or newer
trainer reads (the rule is in ``kubetune_api.trainer``'s module docstring).

The operator writes only fields that differ from their defaults, plus its version; so a config
reads in a trainer of another version unless the job uses a field that trainer does not know.
That holds only while a released default never changes: ``trainer_config_defaults.json`` pins
them. The trainer's side (refusing an unknown field, and saying why) is tests/trainer/test_config_versions.py.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune_api.spec import FineTuneJobSpec
from kubetune_api.trainer import KUBETUNE_VERSION, ReportingSpec, TrainerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULTS_FILE = Path(__file__).with_name("trainer_config_defaults.json")

MINIMAL_SPEC = {
    "model": {"source": "s3://models/base"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run"},
}
#: A spec that sets something in every section the config copies, and a Secret reference.
BUSY_SPEC = {
    "model": {"source": "org/base", "revision": "main", "tokenSecretRef": {"name": "hf"}},
    "dataset": {
        "train": "s3://data/train.jsonl",
        "validationSplit": 0.1,
        "format": "alpaca",
        "fieldMapping": {"output": "response"},
    },
    "method": "lora",
    "quantization": {"bits": 16},
    "lora": {"r": 8, "targetModules": ["q_proj", "v_proj"]},
    "training": {"learningRate": 0.0001, "maxSteps": 500, "evalStrategy": "steps", "evalSteps": 50},
    "storage": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s3"}},
    "output": {"uri": "s3://out/run", "mergeAdapter": True},
    "resources": {"gpus": 2, "scratch": "1Gi"},
}


def _render(spec: dict[str, Any]) -> str:
    """The ConfigMap's config.json for a FineTuneJob spec, as the operator renders it."""
    config = TrainerConfig.from_spec(
        FineTuneJobSpec.model_validate(spec), ReportingSpec(namespace="ml", name="run-7")
    )
    return config.to_json()


def test_the_operator_writes_only_what_differs_from_the_defaults_and_its_version() -> None:
    assert json.loads(_render(MINIMAL_SPEC)) == {
        "kubetuneVersion": KUBETUNE_VERSION,
        **MINIMAL_SPEC,
        "reporting": {"namespace": "ml", "name": "run-7"},
        "gpus": 1,  # the spec's default; the config's own default is 0 (CPU)
    }
    written = json.loads(_render(BUSY_SPEC))
    # Inside a section too, only what was set: a trainer that lacks a new training field still
    # reads a config whose training section leaves that field out.
    assert written["training"] == BUSY_SPEC["training"]
    assert written["dataset"]["fieldMapping"] == {"output": "response"}
    assert written["gpus"] == 2
    assert written["scratchBytes"] == 2**30
    assert "SecretRef" not in json.dumps(written)


def test_rendered_config_round_trips_through_the_file(tmp_path: Path) -> None:
    for spec in (MINIMAL_SPEC, BUSY_SPEC):
        config = TrainerConfig.from_spec(FineTuneJobSpec.model_validate(spec), ReportingSpec(name="run-7"))
        path = tmp_path / "config.json"
        path.write_text(config.to_json())
        again = TrainerConfig.from_file(path)
        assert again == config
        assert again.kubetune_version == KUBETUNE_VERSION
        assert again.fingerprint() == config.fingerprint()


def test_an_older_operators_config_without_the_newer_fields_reads_with_their_defaults() -> None:
    """A config that leaves out every defaulted field (as an operator that predates them would)
    is the config with those fields at their defaults."""
    full = json.loads(DEFAULTS_FILE.read_text())
    older = TrainerConfig.model_validate(MINIMAL_SPEC)  # no kubetuneVersion either: it predates that too
    assert older == TrainerConfig.model_validate(full)
    assert older.kubetune_version is None
    assert json.loads(older.to_json()) == MINIMAL_SPEC


def _models_under(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    seen.add(model)
    for field in model.model_fields.values():
        for kind in _model_types(field.annotation):
            if kind not in seen:
                _models_under(kind, seen)
    return seen


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [kind for arg in getattr(annotation, "__args__", ()) for kind in _model_types(arg)]


def test_a_section_defaults_to_its_own_defaults() -> None:
    """``exclude_defaults`` leaves out a nested field equal to its class's default; the reader
    then applies the enclosing field's default. The two agree only if a section's default is the
    section built with no arguments (``lora: LoraSpec = LoraSpec()``, never ``LoraSpec(r=8)``)."""
    models = _models_under(TrainerConfig, set())
    assert len(models) > 5
    for model in models:
        for name, field in model.model_fields.items():
            if isinstance(field.default, BaseModel):
                assert field.default == type(field.default)(), f"{model.__name__}.{name}"


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {
            path: leaf for key, sub in value.items() for path, leaf in _leaves(sub, f"{prefix}.{key}").items()
        }
    return {prefix.lstrip("."): value}


def test_released_defaults_never_change() -> None:
    """A config leaves out fields at their default, and so does the fingerprint: a changed
    default would change what existing jobs train (and resume from) without changing either.

    Change a default by adding a field instead. A new field goes into
    trainer_config_defaults.json with its default, which must mean what configs without it meant.
    """
    pinned = _leaves(json.loads(DEFAULTS_FILE.read_text()))
    current = _leaves(json.loads(TrainerConfig.model_validate(MINIMAL_SPEC).to_resolved_json()))
    changed = {
        path: (pinned[path], current.get(path, "<removed>"))
        for path in pinned
        if current.get(path, "<removed>") != pinned[path]
    }
    assert not changed, f"released defaults changed or removed (pinned, now): {changed}"
    added = sorted(set(current) - set(pinned))
    assert not added, f"new field(s) {added}: add them with their default to {DEFAULTS_FILE.name}"


def test_to_resolved_json_lists_every_field() -> None:
    resolved = json.loads(TrainerConfig.model_validate(MINIMAL_SPEC).to_resolved_json())
    assert resolved["workDir"] == "/tmp/kubetune"
    assert resolved["training"]["maxSeqLength"] == 1024
    assert resolved["kubetuneVersion"] is None


def test_one_version_for_the_distribution_the_chart_and_the_default_trainer_image() -> None:
    """The remedy for a too-old trainer is "unset spec.image": the operator's default trainer
    image must then be the operator's own version."""
    from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    chart = yaml.safe_load((REPO_ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    assert pyproject["project"]["version"] == KUBETUNE_VERSION
    assert chart["appVersion"] == KUBETUNE_VERSION
    assert DEFAULT_TRAINER_IMAGE.rpartition(":")[2] == KUBETUNE_VERSION
