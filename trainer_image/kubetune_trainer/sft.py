"""The TRL glue: ``training`` -> ``SFTConfig``, rows TRL can mask, and the ``SFTTrainer`` itself.

The SFTConfig is built from a declared map: every ``training`` field whose name SFTConfig also
has is passed as it is (a new same-named spec field needs nothing here), the few that TRL names
differently or that depend on the hardware are in :data:`TRANSLATED`, the one the model loading
reads is in :data:`READ_AT_LOAD`, and kubetune's own fixed choices are in :func:`fixed_arguments`.
tests/trainer/test_sft.py fails when a ``training`` field is in none of these places.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import TrainingSpec

from . import batching, hardware, throughput
from .dataset import ValidatedData
from .formats import split_last_assistant_turn

log = logging.getLogger(__name__)

#: ``training`` fields that reach SFTConfig under another name, or through a decision for the
#: hardware: the field -> the SFTConfig arguments :func:`translated` sets from it.
TRANSLATED: Final = {
    "max_seq_length": ("max_length",),
    "warmup_ratio": ("warmup_steps",),  # transformers 5: a warmup_steps below 1 is a ratio
    "warmup_steps": ("warmup_steps",),
    "precision": ("bf16", "fp16"),  # resolved by hardware.choose_precision
    "gradient_checkpointing": ("activation_checkpointing",),  # resolved: on for GPUs, off on CPU
    # The next three are resolved by throughput.plan from the hardware and what is installed.
    "batching": ("padding_free",),  # length-grouped is the sampler of build_trainer's class
    "liger_kernel": ("use_liger_kernel",),
    "optim": ("optim",),
}
#: ``training`` fields that reach the model's loading (modeling.load_model), not SFTConfig.
READ_AT_LOAD: Final = frozenset({"attn_implementation"})


@dataclass(frozen=True)
class Plan:
    """What the trainer decided for this hardware and data, before building the SFTConfig."""

    precision: hardware.PrecisionChoice
    cuda: bool
    gradient_checkpointing: bool
    assistant_only_loss: bool
    speed: throughput.ThroughputPlan


@cache
def config_fields(config_class: type) -> frozenset[str]:
    """The argument names of a TrainingArguments dataclass: transformers' own, SFTConfig, or the
    other TRL configs (DPO, ORPO, KTO, reward)."""
    return frozenset(field.name for field in dataclasses.fields(config_class))


def passed_as_is(
    training: TrainingSpec, config_class: type, not_applicable: Collection[str] = ()
) -> dict[str, Any]:
    """The ``training`` fields ``config_class`` takes under their own (snake_case) names: those it
    has, less :data:`TRANSLATED`, :data:`READ_AT_LOAD` and the caller's ``not_applicable``."""
    skip = TRANSLATED.keys() | READ_AT_LOAD | set(not_applicable)
    names = config_fields(config_class) - skip
    return {name: getattr(training, name) for name in type(training).model_fields if name in names}


def sft_fields() -> frozenset[str]:
    from trl.trainer.sft_config import SFTConfig

    return config_fields(SFTConfig)


def same_named(training: TrainingSpec) -> dict[str, Any]:
    """The ``training`` fields SFTConfig takes under their own (snake_case) names."""
    from trl.trainer.sft_config import SFTConfig

    return passed_as_is(training, SFTConfig)


def translated(training: TrainingSpec, plan: Plan) -> dict[str, Any]:
    """The arguments of :data:`TRANSLATED`."""
    return {
        # Flattened rows without packing: the trainer class truncates them (batching.py).
        "max_length": None if truncates_itself(training, plan) else training.max_seq_length,
        "warmup_steps": training.warmup_steps if training.warmup_steps > 0 else training.warmup_ratio,
        "bf16": plan.precision.precision == "bf16",
        "fp16": plan.precision.precision == "fp16",
        "activation_checkpointing": plan.gradient_checkpointing,
        "padding_free": plan.speed.batching == "padding-free",
        "use_liger_kernel": plan.speed.liger_kernel,
        "optim": plan.speed.optim,
    }


def fixed_arguments(plan: Plan, output_dir: Path) -> dict[str, Any]:
    """kubetune's own choices: status reporting replaces TRL's loggers, progress bars and trackers."""
    return {
        "output_dir": str(output_dir),
        "logging_first_step": True,
        "assistant_only_loss": plan.assistant_only_loss,
        "use_cpu": not plan.cuda,
        "include_num_input_tokens_seen": "non_padding",
        # Best-fit packing keeps row boundaries (position ids); "wrapped" would cut rows and join them.
        "packing_strategy": "bfd",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False if hardware.launched_world_size() > 1 else None,
    }


def sft_config(training: TrainingSpec, plan: Plan, output_dir: Path) -> Any:
    from trl.trainer.sft_config import SFTConfig

    return SFTConfig(
        **same_named(training), **translated(training, plan), **fixed_arguments(plan, output_dir)
    )


def chat_uses_assistant_mask(tokenizer: Any) -> bool:
    """Whether TRL can mask non-assistant tokens with this tokenizer's chat template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # an unknown template: TRL cannot patch it
        return False


def to_rows(data: ValidatedData, assistant_mask: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """TRL rows; chat falls back to last-turn prompt/completion without an assistant mask."""
    if data.format != "chat" or assistant_mask:
        return data.train, data.validation
    log.warning(
        "chat template cannot mark assistant tokens: training on the last assistant turn of each record"
    )
    return (
        [split_last_assistant_turn(r["messages"]) for r in data.train],
        [split_last_assistant_turn(r["messages"]) for r in data.validation],
    )


def truncates_itself(training: TrainingSpec, plan: Plan) -> bool:
    """Padding-free without packing: TRL takes no max_length then, the trainer class truncates."""
    return plan.speed.batching == "padding-free" and not training.packing


def trainer_class(speed: throughput.ThroughputPlan, packing: bool = False) -> type:
    """TRL's SFTTrainer, with the length-grouped sampler or the row truncation the batching needs."""
    from trl.trainer.sft_trainer import SFTTrainer

    if speed.batching == "length-grouped":
        return batching.length_grouped_trainer_class()
    if speed.batching == "padding-free" and not packing:
        return batching.padding_free_trainer_class()
    trainer: type = SFTTrainer
    return trainer


def build_trainer(
    model: Any,
    *,
    tokenizer: Any,
    args: Any,
    datasets: tuple[Any, Any | None],
    peft_config: Any,
    callbacks: list[Any],
    speed: throughput.ThroughputPlan,
    max_row_length: int,
) -> Any:
    train_ds, eval_ds = datasets
    cls = trainer_class(speed, args.packing)
    extra = {"max_row_length": max_row_length} if cls is batching.padding_free_trainer_class() else {}
    return cls(
        **extra,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
