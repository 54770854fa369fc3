"""Throughput decisions: the attention kernel, the batching, Liger kernels and the optimizer.

Pure functions of the spec, the :class:`~.hardware.Hardware` and what is installed, so every
combination is tested without a GPU (tests/trainer/test_throughput.py). Each decision carries the
reason it is logged with: a CPU fallback is never silent.

Why the batching depends on the attention kernel: a padding-free batch is the rows flattened into
one sequence. flash attention's varlen kernel keeps the rows apart by their boundaries at no cost;
sdpa and eager need a block-diagonal mask (transformers builds one from the position ids), whose
cost grows with the square of the flattened length, so there rows of similar length padded to the
longest of their batch are faster (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Literal

from kubetune_api.spec import (
    BITSANDBYTES_OPTIMIZERS,
    AttnImplementation,
    Batching,
    Method,
    Optimizer,
    TrainingSpec,
)

from .errors import InvalidConfigError
from .hardware import Hardware, PrecisionChoice

ResolvedAttention = Literal["sdpa", "eager", "flash_attention_2"]
ResolvedBatching = Literal["padded", "length-grouped", "padding-free"]


@dataclass(frozen=True)
class Installed:
    """The optional kernel packages the trainer image may carry."""

    flash_attn: bool
    liger_kernel: bool


def installed() -> Installed:
    return Installed(
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
    )


@dataclass(frozen=True)
class ThroughputPlan:
    """What the trainer runs with, and why (one line per decision, logged and in metrics.json)."""

    attn_implementation: ResolvedAttention
    batching: ResolvedBatching
    liger_kernel: bool
    optim: str
    reasons: tuple[str, ...]


def choose_attention(
    requested: AttnImplementation, hw: Hardware, precision: PrecisionChoice, kernels: Installed
) -> tuple[ResolvedAttention, str]:
    half = precision.precision in ("bf16", "fp16")
    if requested == "flash_attention_2":
        if not hw.cuda:
            raise InvalidConfigError(
                "training.attnImplementation flash_attention_2 needs a GPU; use auto or sdpa"
            )
        if not kernels.flash_attn:
            raise InvalidConfigError(
                "training.attnImplementation flash_attention_2 needs the flash-attn package in the trainer"
                " image; install it there, or use auto or sdpa"
            )
        if not half:
            raise InvalidConfigError(
                "training.attnImplementation flash_attention_2 runs in bf16 or fp16 only;"
                " set training.precision to auto or bf16, or use sdpa"
            )
        return "flash_attention_2", "requested flash_attention_2"
    if requested != "auto":
        return requested, f"requested {requested}"
    if not hw.cuda:
        return "sdpa", "auto: sdpa on CPU (flash attention needs a GPU)"
    if not kernels.flash_attn:
        return "sdpa", "auto: sdpa (the flash-attn package is not installed in the trainer image)"
    if not half:
        return "sdpa", f"auto: sdpa (flash attention needs bf16 or fp16, precision is {precision.precision})"
    return "flash_attention_2", f"auto: flash_attention_2 ({hw.device_name}, {precision.precision})"


def choose_batching(
    requested: Batching, packing: bool, attention: ResolvedAttention
) -> tuple[ResolvedBatching, str]:
    if packing:
        return "padding-free", "packing: best-fit packed rows, kept apart by their position ids"
    if requested != "auto":
        return requested, f"requested {requested}"
    if attention == "flash_attention_2":
        return "padding-free", "auto: padding-free (flash attention's varlen kernel keeps rows apart)"
    return "length-grouped", f"auto: length-grouped ({attention} would need a block-diagonal mask)"


def choose_liger(requested: bool | None, hw: Hardware, kernels: Installed) -> tuple[bool, str]:
    if requested is False:
        return False, "off: training.ligerKernel is false"
    if requested and not hw.cuda:
        raise InvalidConfigError("training.ligerKernel needs a GPU (Triton kernels); unset it on CPU")
    if requested and not kernels.liger_kernel:
        raise InvalidConfigError(
            "training.ligerKernel needs the liger-kernel package in the trainer image; install it or unset it"
        )
    if requested:
        return True, "on: requested"
    if not hw.cuda:
        return False, "auto: off on CPU (Triton kernels need a GPU)"
    if not kernels.liger_kernel:
        return False, "auto: off (the liger-kernel package is not installed in the trainer image)"
    return True, f"auto: on ({hw.device_name})"


def choose_optimizer(requested: Optimizer, method: Method, hw: Hardware) -> tuple[str, str]:
    if requested in BITSANDBYTES_OPTIMIZERS and not hw.cuda:
        raise InvalidConfigError(
            f"training.optim {requested} runs on a GPU only (bitsandbytes); use auto or adamw_torch on CPU"
        )
    if requested != "auto":
        return requested, f"requested {requested}"
    if not hw.cuda:
        return "adamw_torch", "auto: adamw_torch on CPU"
    if method == "qlora":
        return "paged_adamw_8bit", "auto: paged_adamw_8bit for qlora on a GPU (8-bit states, paged on spikes)"
    return "adamw_torch_fused", "auto: adamw_torch_fused on a GPU"


def plan(
    training: TrainingSpec, method: Method, hw: Hardware, precision: PrecisionChoice, kernels: Installed
) -> ThroughputPlan:
    """Every throughput decision for this spec on this hardware."""
    attention, attention_why = choose_attention(training.attn_implementation, hw, precision, kernels)
    batching, batching_why = choose_batching(training.batching, training.packing, attention)
    liger, liger_why = choose_liger(training.liger_kernel, hw, kernels)
    optim, optim_why = choose_optimizer(training.optim, method, hw)
    return ThroughputPlan(
        attn_implementation=attention,
        batching=batching,
        liger_kernel=liger,
        optim=optim,
        reasons=(
            f"attention: {attention} ({attention_why})",
            f"batching: {batching} ({batching_why})",
            f"liger kernels: {liger_why}",
            f"optimizer: {optim} ({optim_why})",
        ),
    )


def without_padding_free(speed: ThroughputPlan, trainer: str) -> ThroughputPlan:
    """``speed`` with a batching a padding collator can do, for the objectives and the task whose
    ``trainer`` (e.g. ``objective dpo``, ``task sequence-classification``) pads every batch: TRL
    1.16's DPO, ORPO, KTO and reward collators and transformers' DataCollatorWithPadding.
    padding-free (the auto choice with flash attention) becomes length-grouped, with the reason
    added; an explicit padding-free is refused at apply time (spec.NO_PADDING_FREE)."""
    if speed.batching != "padding-free":
        return speed
    reason = f"batching: length-grouped ({trainer}: the collator pads, no padding-free batches)"
    return dataclasses.replace(speed, batching="length-grouped", reasons=(*speed.reasons, reason))
