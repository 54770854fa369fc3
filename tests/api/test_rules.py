"""The models refuse what the API server refuses, naming the same field, and accept what it accepts.

tests/operator/invalid/*.yaml are the manifests the real kube-apiserver must reject
(tests/operator/test_api_server.py); here the same files go through the Python models, so the
SDK, the operator and the trainer judge a manifest exactly as ``kubectl apply`` does.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune_api.base import ApiModel, Rule, field_errors
from kubetune_api.crd import finetunejob_crd
from kubetune_api.resource import FineTuneJob
from kubetune_api.spec import FineTuneJobSpec
from kubetune_api.trainer import ReportingSpec, TrainerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((REPO_ROOT / "tests" / "operator" / "invalid").glob("*.yaml"))
#: Update cases need the stored object (oldSelf): only the API server can judge them.
CREATE_CASES = [p for p in INVALID if len(list(yaml.safe_load_all(p.read_text()))) == 1]
EXAMPLES = [
    # finetunejob.yaml and every finetunejob-<objective or method>.yaml
    *sorted((REPO_ROOT / "examples").glob("finetunejob*.yaml")),
    REPO_ROOT / "examples" / "argocd" / "finetunejobs" / "alpaca-qlora.yaml",
    REPO_ROOT / "examples" / "local" / "finetunejob-tiny.yaml",
]
#: What hack/kubetune_localenv/stack.py fills into the tiny template's placeholders.
TEMPLATE_VALUES = {
    "NAME": "tiny-chat",
    "NAMESPACE": "demo",
    "BUCKET": "kubetune-demo",
    "FORMAT": "chat",
    "MAX_STEPS": 24,
    "SAVE_STEPS": 8,
    "S3_ENDPOINT": "http://127.0.0.1:9000",
}


def _expected_field(path: Path) -> str:
    return next(
        line.split(":", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    )


def _expected_message(path: Path) -> str | None:
    """``# message:`` (both the API server and the models say it) or ``# model-message:``."""
    for line in path.read_text().splitlines():
        if line.startswith(("# message:", "# model-message:")):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize("manifest", CREATE_CASES, ids=[p.stem for p in CREATE_CASES])
def test_invalid_manifest_is_refused_by_the_models_naming_the_field(manifest: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.model_validate(yaml.safe_load(manifest.read_text()))
    field = _expected_field(manifest)
    problems = field_errors(caught.value)
    assert any(line.startswith(field) for line in problems), f"{field} not named in {problems}"
    words = _expected_message(manifest)
    assert words is None or any(words in line for line in problems), f"{words!r} not in {problems}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid_and_render_a_trainer_config(example: Path) -> None:
    text = string.Template(example.read_text()).substitute(TEMPLATE_VALUES)
    job = FineTuneJob.model_validate(yaml.safe_load(text))
    config = TrainerConfig.from_spec(job.spec, ReportingSpec(name=job.metadata.name))
    assert config.output == job.spec.output
    assert config.gpus == job.spec.resources.gpus
    # Secret references stay in the pod spec; the trainer's config never holds them.
    assert "SecretRef" not in config.to_json()


def _rule_models() -> list[type[ApiModel]]:
    seen: list[type[ApiModel]] = []
    pending: list[type[ApiModel]] = [FineTuneJob, TrainerConfig]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            for candidate in _model_types(info.annotation):
                pending.append(candidate)
    return seen


def _model_types(annotation: Any) -> list[type[ApiModel]]:
    if isinstance(annotation, type) and issubclass(annotation, ApiModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def _crd_rules() -> list[dict[str, str]]:
    found: list[dict[str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        found.extend(node.get("x-kubernetes-validations", []))
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return found


def test_every_python_rule_is_in_the_crd() -> None:
    """A rule declared on a model reaches the API server (TrainerConfig reuses the spec's)."""
    crd_rules = _crd_rules()
    declared: list[Rule] = [rule for model in _rule_models() for rule in model.cel_rules]
    assert len(declared) >= 8
    for rule in declared:
        assert rule.as_crd() in crd_rules, rule.cel


def test_rule_error_names_the_rule_field() -> None:
    spec = {
        "model": {"source": "org/model"},
        "dataset": {"train": "s3://data/t.jsonl", "validation": "s3://data/v.jsonl", "validationSplit": 0.2},
        "output": {"uri": "s3://out/run"},
    }
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(spec)
    message = "dataset.validation and dataset.validationSplit are exclusive: set one of them"
    assert field_errors(caught.value) == [f"dataset.validationSplit: {message}"]
