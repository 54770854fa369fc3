"""The TRL glue: ``training`` reaches SFTConfig through the declared map, and nothing falls through."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_api.spec import TrainingSpec
from kubetune_trainer import batching, sft, throughput
from kubetune_trainer.hardware import Hardware, PrecisionChoice

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
H100 = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False, device_name="NVIDIA H100")
FP32, BF16 = PrecisionChoice("fp32", "test"), PrecisionChoice("bf16", "test")
NOTHING_INSTALLED = throughput.Installed(flash_attn=False, liger_kernel=False)
CPU_PLAN = sft.Plan(
    FP32,
    cuda=False,
    gradient_checkpointing=False,
    assistant_only_loss=False,
    speed=throughput.plan(TrainingSpec(), "qlora", CPU, FP32, NOTHING_INSTALLED),
)


def test_every_training_field_is_passed_or_translated() -> None:
    fields = set(TrainingSpec.model_fields)
    passed = set(sft.same_named(TrainingSpec()))
    translated = set(sft.TRANSLATED)
    assert not passed & translated
    assert not (passed | translated) & sft.READ_AT_LOAD
    assert fields == passed | translated | sft.READ_AT_LOAD, (
        f"reach neither SFTConfig nor a translation: {fields - passed - translated - sft.READ_AT_LOAD}"
    )


def test_the_translations_set_exactly_the_arguments_they_declare() -> None:
    declared = {argument for arguments in sft.TRANSLATED.values() for argument in arguments}
    assert set(sft.translated(TrainingSpec(), CPU_PLAN)) == declared
    assert declared <= sft.sft_fields()


def test_a_new_same_named_field_needs_no_glue() -> None:
    """What adding e.g. training.adamBeta2 to the model would do: SFTConfig gets it as it is."""

    class WithAdamBeta2(TrainingSpec):
        adam_beta2: float = 0.95

    assert sft.same_named(WithAdamBeta2())["adam_beta2"] == 0.95


@pytest.mark.parametrize(
    ("training", "warmup"),
    [({"warmupSteps": 7}, 7), ({"warmupRatio": 0.25}, 0.25), ({}, 0)],
)
def test_sft_config_carries_the_spec_and_the_plan(
    tmp_path: Path, training: dict[str, float], warmup: float
) -> None:
    spec = TrainingSpec.model_validate(
        {"maxSeqLength": 256, "learningRate": 0.001, "maxSteps": 9, **training}
    )
    args = sft.sft_config(spec, CPU_PLAN, tmp_path)
    assert (args.max_length, args.learning_rate, args.max_steps) == (256, 0.001, 9)
    assert args.warmup_steps == warmup
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)
    assert args.activation_checkpointing is False
    assert args.report_to == []  # "none": progress goes to status, not to a tracker
    assert args.output_dir == str(tmp_path)


def test_gpu_plan_turns_on_bf16_and_checkpointing(tmp_path: Path) -> None:
    installed = throughput.Installed(flash_attn=True, liger_kernel=True)
    plan = sft.Plan(
        BF16,
        cuda=True,
        gradient_checkpointing=True,
        assistant_only_loss=True,
        speed=throughput.plan(TrainingSpec(), "qlora", H100, BF16, installed),
    )
    kwargs = sft.translated(TrainingSpec(), plan) | sft.fixed_arguments(plan, tmp_path)
    assert (kwargs["bf16"], kwargs["fp16"], kwargs["use_cpu"]) == (True, False, False)
    assert kwargs["activation_checkpointing"] is True
    assert kwargs["assistant_only_loss"] is True
    # The fast path on a GPU-shaped config: flattened rows, Liger kernels, the QLoRA optimizer.
    assert (kwargs["padding_free"], kwargs["use_liger_kernel"], kwargs["optim"]) == (
        True,
        True,
        "paged_adamw_8bit",
    )


def test_cpu_defaults_reach_trl_as_length_grouped_adamw(tmp_path: Path) -> None:
    args = sft.sft_config(TrainingSpec(), CPU_PLAN, tmp_path)
    assert (args.padding_free, args.use_liger_kernel, args.optim) == (False, False, "adamw_torch")
    assert CPU_PLAN.speed.batching == "length-grouped"


@pytest.mark.parametrize(
    ("choice", "packing", "expected"),
    [
        ("length-grouped", False, batching.length_grouped_trainer_class()),
        ("padded", False, None),
        ("padding-free", False, batching.padding_free_trainer_class()),
        ("padding-free", True, None),  # TRL packs and truncates itself
    ],
)
def test_the_trainer_class_follows_the_batching(choice: str, packing: bool, expected: type | None) -> None:
    from trl.trainer.sft_trainer import SFTTrainer

    speed = throughput.ThroughputPlan("sdpa", choice, False, "adamw_torch", ())  # type: ignore[arg-type]
    assert sft.trainer_class(speed, packing) is (expected or SFTTrainer)


def test_flattened_rows_without_packing_give_trl_no_max_length(tmp_path: Path) -> None:
    speed = throughput.ThroughputPlan("sdpa", "padding-free", False, "adamw_torch", ())
    plan = sft.Plan(FP32, cuda=False, gradient_checkpointing=False, assistant_only_loss=False, speed=speed)
    spec = TrainingSpec.model_validate({"maxSeqLength": 256})
    assert sft.sft_config(spec, plan, tmp_path).max_length is None
    packed = TrainingSpec.model_validate({"maxSeqLength": 256, "packing": True})
    assert sft.sft_config(packed, plan, tmp_path).max_length == 256
