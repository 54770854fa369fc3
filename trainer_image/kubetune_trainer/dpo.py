"""The DPO glue: ``training`` + ``dpo`` -> ``DPOConfig``, batching DPO can do, and the ``DPOTrainer``.

Built like :mod:`.sft`: every ``training`` field whose name DPOConfig also has is passed as it
is, the ones TRL names differently or that depend on the hardware go through the same
translations as SFT (:data:`sft.TRANSLATED`), the ones that do not apply to DPO are in
:data:`NOT_APPLICABLE` (each refused at apply time when set), and the ``dpo`` section maps by
:data:`DPO_SECTION`. tests/trainer/test_dpo.py fails when a field is in none of these places.

The reference model is the frozen base: ``DPOTrainer`` gets ``ref_model=None`` with a peft
adapter to train, so it computes the reference log-probabilities with the adapter disabled,
on the same weights (no second copy of the model in memory).
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cache
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import DpoSpec, TrainingSpec

from . import batching, reporting, sft, throughput

log = logging.getLogger(__name__)

#: ``training`` fields that do not reach DPOConfig, and why (each is refused at apply time with
#: objective dpo: spec.DPO_NO_PACKING, spec.DPO_NO_PADDING_FREE).
NOT_APPLICABLE: Final = {
    "packing": "TRL's DPO has no packing: each prompt is batched with its chosen and rejected responses",
}
#: ``dpo`` fields -> the DPOConfig argument each sets.
DPO_SECTION: Final = {"beta": "beta", "loss_type": "loss_type"}
#: SFT's fixed arguments that DPOConfig does not have.
SFT_ONLY_FIXED: Final = frozenset({"assistant_only_loss", "packing_strategy"})
#: TRL's logged DPO metrics -> their metrics.json names, the same as status.progress's.
REWARD_METRICS: Final = reporting.REWARD_PROGRESS


@cache
def dpo_fields() -> frozenset[str]:
    from trl.trainer.dpo_config import DPOConfig

    return frozenset(field.name for field in dataclasses.fields(DPOConfig))


def same_named(training: TrainingSpec) -> dict[str, Any]:
    """The ``training`` fields DPOConfig takes under their own (snake_case) names."""
    skip = sft.TRANSLATED.keys() | sft.READ_AT_LOAD | NOT_APPLICABLE.keys()
    return {
        name: getattr(training, name) for name in type(training).model_fields if name in dpo_fields() - skip
    }


def translated(training: TrainingSpec, plan: sft.Plan) -> dict[str, Any]:
    """SFT's translations, with DPO's own length handling: TRL's DPO truncates every pair at
    ``max_length`` itself (keep the start) and has no padding-free batches."""
    return {
        **sft.translated(training, plan),
        "max_length": training.max_seq_length,
        "padding_free": False,
    }


def section(spec: DpoSpec) -> dict[str, Any]:
    """The arguments of :data:`DPO_SECTION` (TRL takes a list of loss types, to mix; one here)."""
    return {"beta": spec.beta, "loss_type": [spec.loss_type]}


def fixed_arguments(plan: sft.Plan, output_dir: Path) -> dict[str, Any]:
    """kubetune's fixed choices for SFT, less the SFT-only ones. TRL's default of turning dropout
    off stays: the policy and the reference then score a response with the same network (so
    ``lora.dropout`` does not apply to DPO)."""
    fixed = sft.fixed_arguments(plan, output_dir)
    return {key: value for key, value in fixed.items() if key not in SFT_ONLY_FIXED}


def dpo_config(training: TrainingSpec, spec: DpoSpec | None, plan: sft.Plan, output_dir: Path) -> Any:
    from trl.trainer.dpo_config import DPOConfig

    return DPOConfig(
        **same_named(training),
        **translated(training, plan),
        **section(spec or DpoSpec()),
        **fixed_arguments(plan, output_dir),
    )


def batching_for_dpo(speed: throughput.ThroughputPlan) -> throughput.ThroughputPlan:
    """The throughput plan with a batching TRL's DPO collator can do.

    padding-free (the auto choice with flash attention) becomes length-grouped: TRL 1.16's DPO
    pads every batch (its padding_free falls back to padding with a warning). An explicit
    padding-free is refused at apply time.
    """
    if speed.batching != "padding-free":
        return speed
    reason = "batching: length-grouped (objective dpo: TRL's DPO collator pads, no padding-free batches)"
    log.info("%s", reason)
    return dataclasses.replace(speed, batching="length-grouped", reasons=(*speed.reasons, reason))


def pair_lengths(dataset: Any) -> list[int]:
    """Token counts of a TRL-prepared preference dataset: the prompt and the longer response (the
    collator pads a pair's chosen and rejected rows to the batch's longest)."""
    return [
        len(prompt) + max(len(chosen), len(rejected))
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True
        )
    ]


@cache
def length_grouped_trainer_class() -> type:
    """TRL's DPOTrainer whose training batches come in kubetune's length-grouped order."""
    from trl.trainer.dpo_trainer import DPOTrainer

    class LengthGroupedDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return batching.LengthGroupedSampler(
                pair_lengths(dataset), self.args.per_device_train_batch_size, self.args.seed
            )

    return LengthGroupedDPOTrainer


def trainer_class(speed: throughput.ThroughputPlan) -> type:
    """Length-grouped or TRL's own (padded, random order) DPOTrainer."""
    from trl.trainer.dpo_trainer import DPOTrainer

    if speed.batching == "length-grouped":
        return length_grouped_trainer_class()
    trainer: type = DPOTrainer
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
) -> Any:
    """The DPOTrainer; ``ref_model=None`` with ``peft_config``: the reference is the base model
    with the adapter disabled."""
    train_ds, eval_ds = datasets
    return trainer_class(speed)(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's DPO figures: the last logged training and evaluation rewards, and their
    history by step (TRL's own names in the history)."""
    out: dict[str, Any] = {}
    for trl_name, name in REWARD_METRICS.items():
        out[name] = _last(log_history, trl_name)
        out["eval" + name[0].upper() + name[1:]] = _last(log_history, f"eval_{trl_name}")
    out["rewardHistory"] = [
        {"step": e["step"], **{k: e[k] for k in REWARD_METRICS if k in e}}
        for e in log_history
        if "rewards/accuracies" in e
    ]
    return out


def _last(log_history: list[dict[str, Any]], key: str) -> float | None:
    value = next((e[key] for e in reversed(log_history) if key in e), None)
    return None if value is None else float(value)
