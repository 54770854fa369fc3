"""The DPO glue: ``training`` + ``dpo`` -> ``DPOConfig``, and the ``DPOTrainer``.

Built by :mod:`.preference`'s declared map: every ``training`` field whose name DPOConfig also has
is passed as it is, the ones TRL names differently or that depend on the hardware go through the
same translations as SFT (:data:`sft.TRANSLATED`), the ones that do not apply to DPO are in
:data:`NOT_APPLICABLE` (each refused at apply time when set), and the ``dpo`` section maps by
:data:`DPO_SECTION`. tests/trainer/test_dpo.py fails when a field is in none of these places.

The reference model is the frozen base: ``DPOTrainer`` gets ``ref_model=None`` with a peft
adapter to train, so it computes the reference log-probabilities with the adapter disabled,
on the same weights (no second copy of the model in memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import DpoSpec, TrainingSpec

from . import batching, preference, reporting, sft, throughput

#: ``training`` fields that do not reach DPOConfig, and why (each is refused at apply time with
#: objective dpo: spec.NO_PACKING).
NOT_APPLICABLE: Final = {"packing": preference.NO_PACKING}
#: ``dpo`` fields -> the DPOConfig argument each sets.
DPO_SECTION: Final = {"beta": "beta", "loss_type": "loss_type"}
#: TRL's logged DPO metrics -> their metrics.json names, the same as status.progress's.
REWARD_METRICS: Final = reporting.REWARD_PROGRESS


def config_class() -> type:
    from trl.trainer.dpo_config import DPOConfig

    return DPOConfig


def same_named(training: TrainingSpec) -> dict[str, Any]:
    """The ``training`` fields DPOConfig takes under their own (snake_case) names."""
    return sft.passed_as_is(training, config_class(), NOT_APPLICABLE.keys())


def section(spec: DpoSpec) -> dict[str, Any]:
    """The arguments of :data:`DPO_SECTION` (TRL takes a list of loss types, to mix; one here)."""
    return {"beta": spec.beta, "loss_type": [spec.loss_type]}


def dpo_config(
    training: TrainingSpec,
    spec: DpoSpec | None,
    plan: sft.Plan,
    output_dir: Path,
    reference: Mapping[str, Any] | None = None,
) -> Any:
    """The DPOConfig; ``reference``: from_pretrained's arguments for the reference copy TRL loads
    when no adapter trains (modeling.reference_init_kwargs)."""
    return preference.build_config(
        config_class(),
        training,
        plan,
        output_dir,
        section=section(spec or DpoSpec()),
        not_applicable=NOT_APPLICABLE,
        reference=reference,
    )


def pair_lengths(dataset: Any) -> list[int]:
    """Token counts of a TRL-prepared DPO dataset: the prompt and the longer response."""
    return preference.pair_lengths(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])


def trainer_class(speed: throughput.ThroughputPlan) -> type:
    """Length-grouped (kubetune's sampler over :func:`pair_lengths`) or TRL's own (padded, random
    order) DPOTrainer."""
    from trl.trainer.dpo_trainer import DPOTrainer

    if speed.batching == "length-grouped":
        return batching.length_grouped(DPOTrainer, pair_lengths)
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
    preference.log_reference("dpo", args, peft_config)
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
    return preference.reward_metrics(log_history, REWARD_METRICS)
