"""The throughput choices for each hardware, precision and installed-kernel combination."""

from __future__ import annotations

import pytest

from kubetune_api.spec import TrainingSpec
from kubetune_trainer import throughput
from kubetune_trainer.errors import InvalidConfigError
from kubetune_trainer.hardware import Hardware, PrecisionChoice

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
H100 = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False, device_name="NVIDIA H100")
T4 = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=False, device_name="Tesla T4")
BF16, FP16, FP32 = (PrecisionChoice(p, "test") for p in ("bf16", "fp16", "fp32"))
NONE = throughput.Installed(flash_attn=False, liger_kernel=False)
ALL = throughput.Installed(flash_attn=True, liger_kernel=True)


def plan(
    hw: Hardware, precision: PrecisionChoice, kernels: throughput.Installed, **training: object
) -> throughput.ThroughputPlan:
    return throughput.plan(TrainingSpec.model_validate(training), "qlora", hw, precision, kernels)


@pytest.mark.parametrize(
    ("hw", "precision", "kernels", "expected"),
    [
        # The fast path: a GPU with flash-attn and liger-kernel installed.
        (H100, BF16, ALL, ("flash_attention_2", "padding-free", True, "paged_adamw_8bit")),
        (T4, FP16, ALL, ("flash_attention_2", "padding-free", True, "paged_adamw_8bit")),
        # A GPU image without the optional kernels: sdpa, so rows are length-grouped, not flattened.
        (H100, BF16, NONE, ("sdpa", "length-grouped", False, "paged_adamw_8bit")),
        # fp32 on a GPU: flash attention does not run in fp32.
        (H100, FP32, ALL, ("sdpa", "length-grouped", True, "paged_adamw_8bit")),
        # CPU: every GPU-only choice falls back, whatever is installed.
        (CPU, FP32, ALL, ("sdpa", "length-grouped", False, "adamw_torch")),
        (CPU, BF16, NONE, ("sdpa", "length-grouped", False, "adamw_torch")),
    ],
)
def test_auto_choices(
    hw: Hardware,
    precision: PrecisionChoice,
    kernels: throughput.Installed,
    expected: tuple[str, str, bool, str],
) -> None:
    """expected: the attention kernel, the batching, Liger on or off, the optimizer."""
    chosen = plan(hw, precision, kernels)
    assert (chosen.attn_implementation, chosen.batching, chosen.liger_kernel, chosen.optim) == expected
    assert len(chosen.reasons) == 4  # each decision is logged with its reason


def test_every_cpu_fallback_says_why() -> None:
    reasons = " ".join(plan(CPU, FP32, ALL).reasons)
    assert "sdpa on CPU" in reasons
    assert "off on CPU" in reasons
    assert "adamw_torch on CPU" in reasons


def test_lora_on_a_gpu_uses_fused_adamw() -> None:
    chosen = throughput.plan(TrainingSpec(), "lora", H100, BF16, ALL)
    assert chosen.optim == "adamw_torch_fused"


@pytest.mark.parametrize(
    ("training", "batching"),
    [
        ({"packing": True}, "padding-free"),
        ({"batching": "padded"}, "padded"),
        ({"batching": "padding-free"}, "padding-free"),
        ({"batching": "length-grouped"}, "length-grouped"),
    ],
)
def test_requested_batching_is_kept(training: dict[str, object], batching: str) -> None:
    assert plan(CPU, FP32, NONE, **training).batching == batching


def test_requested_sdpa_on_a_flash_gpu_stays_length_grouped() -> None:
    chosen = plan(H100, BF16, ALL, attnImplementation="sdpa")
    assert (chosen.attn_implementation, chosen.batching) == ("sdpa", "length-grouped")


@pytest.mark.parametrize(
    ("hw", "precision", "kernels", "training", "says"),
    [
        (CPU, FP32, ALL, {"attnImplementation": "flash_attention_2"}, "needs a GPU"),
        (H100, BF16, NONE, {"attnImplementation": "flash_attention_2"}, "flash-attn package"),
        (H100, FP32, ALL, {"attnImplementation": "flash_attention_2"}, "bf16 or fp16"),
        (CPU, FP32, ALL, {"ligerKernel": True}, "needs a GPU"),
        (H100, BF16, NONE, {"ligerKernel": True}, "liger-kernel package"),
        (CPU, FP32, ALL, {"optim": "paged_adamw_8bit"}, "GPU only"),
    ],
)
def test_impossible_requests_fail_before_loading_anything(
    hw: Hardware,
    precision: PrecisionChoice,
    kernels: throughput.Installed,
    training: dict[str, object],
    says: str,
) -> None:
    with pytest.raises(InvalidConfigError, match=says):
        plan(hw, precision, kernels, **training)


def test_liger_can_be_turned_off_on_a_gpu() -> None:
    assert plan(H100, BF16, ALL, ligerKernel=False).liger_kernel is False


@pytest.mark.parametrize(
    ("overrides", "trainer"),
    [
        ({"objective": "sft"}, None),
        ({"objective": "dpo"}, "objective dpo"),
        ({"objective": "orpo"}, "objective orpo"),
        ({"objective": "kto"}, "objective kto"),
        ({"objective": "reward"}, "objective reward"),
        (
            {
                "task": "sequence-classification",
                "dataset": {"train": "s3://data/train.jsonl", "format": "classification"},
            },
            "task sequence-classification",
        ),
    ],
)
def test_padding_free_is_for_sft_only(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object], trainer: str | None
) -> None:
    """The pipeline's plan on a GPU with flash attention: padding-free (auto) for sft on a causal
    LM; length-grouped, with the reason logged, for the trainers whose collators pad."""
    from kubetune_api.trainer import TrainerConfig
    from kubetune_trainer import hardware, train

    monkeypatch.setattr(hardware, "probe", lambda: H100)
    monkeypatch.setattr(throughput, "installed", lambda: ALL)
    base = {
        "model": {"source": "s3://models/tiny"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/run"},
    }
    training = {"perDeviceTrainBatchSize": 2}
    cfg = TrainerConfig.model_validate({**base, "training": training, **overrides})
    speed = train.plan_hardware(cfg)[3]
    if trainer is None:
        assert speed.batching == "padding-free"
        return
    assert speed.batching == "length-grouped"
    assert (
        speed.reasons[-1]
        == f"batching: length-grouped ({trainer}: the collator pads, no padding-free batches)"
    )
    assert throughput.without_padding_free(speed, trainer) is speed
