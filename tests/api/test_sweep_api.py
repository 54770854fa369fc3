"""The FineTuneSweep models: searchable paths derived from the FineTuneJob spec, the messages a
wrong search space gets, parameters applied to the template, and the generated CRD."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_api.base import field_errors
from kubetune_api.crd import finetunesweep_crd
from kubetune_api.sweep import (
    MAX_SWEEP_NAME_LENGTH,
    SWEEPABLE,
    FineTuneSweep,
    FineTuneSweepSpec,
    InvalidParametersError,
    apply_parameters,
    check_search_space,
)

Obj = dict[str, Any]


def template(**training: Any) -> Obj:
    return {
        "model": {"source": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl", "validationSplit": 0.1},
        "output": {"uri": "s3://results/sweep"},
        "resources": {"gpus": 0},
        "training": {"evalStrategy": "steps", "evalSteps": 5, **training},
    }


def sweep_spec(**overrides: Any) -> Obj:
    spec: Obj = {
        "template": template(),
        "searchSpace": [{"path": "training.learningRate", "low": 1e-5, "high": 1e-2, "log": True}],
        "maxTrials": 4,
    }
    spec.update(overrides)
    return spec


def errors_of(spec: Obj) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        FineTuneSweepSpec.model_validate(spec)
    return field_errors(caught.value)


def test_searchable_paths_come_from_the_finetunejob_spec() -> None:
    assert SWEEPABLE["training.learningRate"].kind == "float"
    assert SWEEPABLE["lora.r"].kind == "int"
    assert SWEEPABLE["lora.r"].bounds_text() == "at least 1 and at most 1024"
    assert SWEEPABLE["method"].literals == (
        "qlora",
        "lora",
        "full",
        "freeze",
        "prompt-tuning",
        "prefix-tuning",
    )
    assert SWEEPABLE["training.packing"].kind == "categorical"
    # what to train on, where to write and the hardware are no hyperparameters
    assert not any(path.startswith(("output.", "dataset.", "resources.", "model.")) for path in SWEEPABLE)
    assert "lora.targetModules" not in SWEEPABLE  # a list


def test_a_valid_sweep_parses_with_its_defaults() -> None:
    spec = FineTuneSweepSpec.model_validate(sweep_spec())
    assert (spec.sampler, spec.seed, spec.max_parallel, spec.objective.metric) == ("tpe", 0, 1, "evalLoss")
    assert spec.search_space[0].kind == "float"


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        (
            {"path": "output.uri", "choices": ["s3://a/b"]},
            "searchSpace[0].path: must be a numeric or categorical",
        ),
        ({"path": "training.learningRate", "low": 0.1}, "a range needs both low and high"),
        ({"path": "training.learningRate"}, "set either low and high (a range) or choices"),
        ({"path": "method", "low": 1, "high": 2}, "a range (low, high) needs a numeric field"),
        ({"path": "training.learningRate", "low": 0.1, "high": 0.01}, "low must be below high"),
        ({"path": "training.warmupRatio", "low": 0.0, "high": 0.5, "log": True}, "log: true needs a range"),
        ({"path": "lora.r", "low": 4.5, "high": 64}, "this field is an integer: low and high must be whole"),
        ({"path": "training.learningRate", "low": 0.1, "high": 2}, "training.learningRate must be above 0"),
    ],
)
def test_a_wrong_parameter_is_told_what_to_fix(parameter: Obj, expected: str) -> None:
    errors = errors_of(sweep_spec(searchSpace=[parameter]))
    assert any(expected in line for line in errors), errors


def test_sweep_level_rules() -> None:
    lr = {"path": "training.learningRate", "low": 1e-5, "high": 1e-2}
    assert any("each path may appear once" in e for e in errors_of(sweep_spec(searchSpace=[lr, lr])))
    assert any("sampler grid needs choices" in e for e in errors_of(sweep_spec(sampler="grid")))
    no_eval = sweep_spec(template={**template(), "training": {}})
    assert any("objective.metric evalLoss needs evaluation" in e for e in errors_of(no_eval))
    FineTuneSweepSpec.model_validate({**no_eval, "objective": {"metric": "loss"}})
    cancelled = sweep_spec(template={**template(), "cancel": True})
    assert any("template.cancel must be false" in e for e in errors_of(cancelled))


def test_name_leaves_room_for_the_trial_number() -> None:
    long_name = "a" * (MAX_SWEEP_NAME_LENGTH + 1)
    with pytest.raises(ValidationError, match="trial number"):
        FineTuneSweep.model_validate({"metadata": {"name": long_name}, "spec": sweep_spec()})
    FineTuneSweep.model_validate({"metadata": {"name": "a" * MAX_SWEEP_NAME_LENGTH}, "spec": sweep_spec()})


def test_parameters_are_applied_to_the_template() -> None:
    spec = FineTuneSweepSpec.model_validate(sweep_spec())
    applied = apply_parameters(spec.template, {"training.learningRate": 3e-4, "lora.r": 8, "method": "lora"})
    assert (applied.training.learning_rate, applied.lora.r, applied.method) == (3e-4, 8, "lora")
    assert applied.training.eval_steps == 5  # the rest of the template stays
    assert spec.template.lora.r == 16  # the template itself is unchanged


def test_a_choice_the_template_refuses_is_named() -> None:
    # quantization.bits 8 with the default method qlora breaks a rule across fields: CEL cannot see it
    spec = FineTuneSweepSpec.model_validate(
        sweep_spec(searchSpace=[{"path": "quantization.bits", "choices": [4, 8]}])
    )
    with pytest.raises(InvalidParametersError) as caught:
        check_search_space(spec)
    message = str(caught.value)
    assert "searchSpace quantization.bits" in message
    assert "quantization.bits=8" in message
    assert "quantization.bits must be 4 when method is qlora" in message
    wrong_type = FineTuneSweepSpec.model_validate(
        sweep_spec(searchSpace=[{"path": "lora.r", "choices": ["big"]}])
    )
    with pytest.raises(InvalidParametersError, match=r"lora\.r"):
        check_search_space(wrong_type)
    check_search_space(FineTuneSweepSpec.model_validate(sweep_spec()))


def test_the_crd_has_its_printer_columns_and_drops_the_templates_job_wording() -> None:
    crd = finetunesweep_crd()
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Best", "Trials", "Age"]
    template_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["template"]

    def messages(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [r["message"] for r in node.get("x-kubernetes-validations", [])]
            return own + [m for value in node.values() for m in messages(value)]
        if isinstance(node, list):
            return [m for value in node for m in messages(value)]
        return []

    found = messages(template_schema)
    assert "template is immutable once the FineTuneSweep is created" in found
    assert not [m for m in found if "once the FineTuneJob is created" in m]
    assert any("quantization.bits must be 4" in m for m in found)  # the template's own rules stay
