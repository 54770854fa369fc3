"""Objective reward: a reward model (the base with a one-score head) trained on preference pairs
with TRL's ``RewardTrainer``.

TRL's reward trainer takes a sequence-classification model with ``num_labels=1``
(:func:`modeling.load_model` loads it so), scores ``prompt + chosen`` and ``prompt + rejected``
(text pairs get EOS appended; chat pairs are rendered with the chat template) and minimizes
``-log sigmoid(r_chosen - r_rejected)``. A LoRA adapter is peft's ``SEQ_CLS`` task, so the score
head is in ``modules_to_save``: it trains and is saved with the adapter.

``RewardConfig`` comes from the preference trainers' declared map (:func:`preference.build_config`:
same-named ``training`` fields, SFT's translations, kubetune's fixed choices; the reward objective
has no section of its own); ``maxSeqLength`` is TRL's ``max_length``, which *drops* a pair whose
chosen or rejected text is longer (TRL does not truncate: the score is read at the last token).
``batching`` length-grouped orders the pairs by their longer text with kubetune's sampler; padded
is TRL's random order. Dropout is off (TRL's ``disable_dropout``).

TRL logs the share of pairs scored the right way round and the mean score margin as ``accuracy``
and ``margin``; they are logged here under DPO's names (``rewards/accuracies``,
``rewards/margins``), so status.progress and metrics.json carry them as ``rewardAccuracy``,
``rewardMargin`` and, on the validation pairs, ``evalRewardAccuracy``/``evalRewardMargin``, as
DPO's (and ``eval_accuracy`` stays the classifier's). TRL's ``min_reward``/``mean_reward``/
``max_reward`` stay in the log history.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import TrainingSpec

from . import batching, preference, sft, throughput
from .errors import InvalidDataError

log = logging.getLogger(__name__)

#: ``training`` fields that do not reach RewardConfig, and why (refused at apply time: NO_PACKING).
NOT_APPLICABLE: Final = {"packing": "TRL's reward trainer batches a pair's two texts, it never packs"}
#: TRL's RewardTrainer metrics -> the names they are logged under (DPO's: reporting.REWARD_PROGRESS).
RENAMED: Final = {"accuracy": "rewards/accuracies", "margin": "rewards/margins"}
#: The logged reward-model metrics -> their metrics.json names (status.progress's too).
REWARD_METRICS: Final = {"rewards/accuracies": "rewardAccuracy", "rewards/margins": "rewardMargin"}


def reward_config(training: TrainingSpec, plan: sft.Plan, output_dir: Path) -> Any:
    from trl.trainer.reward_config import RewardConfig

    return preference.build_config(
        RewardConfig, training, plan, output_dir, section={}, not_applicable=NOT_APPLICABLE
    )


def renamed(logs: dict[str, Any]) -> dict[str, Any]:
    """``logs`` with TRL's reward metrics under :data:`RENAMED`'s names (``eval_`` ones too)."""
    names = {**RENAMED, **{f"eval_{k}": f"eval_{v}" for k, v in RENAMED.items()}}
    return {names.get(key, key): value for key, value in logs.items()}


def pair_lengths(dataset: Any) -> list[int]:
    """Token counts of a TRL-prepared reward dataset: the longer of a pair's two texts (the
    collator pads both rows of a pair to the batch's longest)."""
    return [
        max(len(chosen), len(rejected))
        for chosen, rejected in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


@cache
def _renaming_base() -> type:
    from transformers import Trainer

    class RenamingTrainer(Trainer):
        """Comes between TRL's RewardTrainer and transformers' Trainer in the method resolution
        order, so it renames the metrics RewardTrainer.log has just added before any callback
        (progress, TensorBoard, MLflow) or the log history sees them."""

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            super().log(renamed(logs), start_time)

    return RenamingTrainer


@cache
def renaming_trainer_class() -> type:
    """TRL's RewardTrainer, logging under DPO's names."""
    from trl.trainer.reward_trainer import RewardTrainer

    class KubetuneRewardTrainer(RewardTrainer, _renaming_base()):  # type: ignore[misc]
        pass

    return KubetuneRewardTrainer


def trainer_class(speed: throughput.ThroughputPlan) -> type:
    """With kubetune's length-grouped sampler (by :func:`pair_lengths`), or TRL's own random order."""
    if speed.batching == "length-grouped":
        return batching.length_grouped(renaming_trainer_class(), pair_lengths)
    return renaming_trainer_class()


def build_trainer(
    model: Any,
    *,
    tokenizer: Any,
    args: Any,
    datasets: tuple[Any, Any | None],
    peft_config: Any | None,
    callbacks: list[Any],
    speed: throughput.ThroughputPlan,
) -> Any:
    """The RewardTrainer; fails (exit 42) when TRL's length filter leaves no training pair."""
    train_ds, eval_ds = datasets
    trainer = trainer_class(speed)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    _check_kept("training", len(trainer.train_dataset), len(train_ds), args.max_length)
    if eval_ds is not None:
        _check_kept("validation", len(trainer.eval_dataset), len(eval_ds), args.max_length)
    return trainer


def _check_kept(which: str, kept: int, total: int, max_length: int) -> None:
    """Log the pairs TRL's length filter left out of ``which`` data; fail (exit 42) if none is
    left (an empty validation set would fail at the first evaluation, after training)."""
    if kept < total:
        log.warning(
            "reward: %d of %d %s pairs are longer than training.maxSeqLength %s tokens and are"
            " left out (TRL's reward trainer does not truncate)",
            total - kept,
            total,
            which,
            max_length,
        )
    if not kept:
        raise InvalidDataError(
            [
                f"every {which} pair is longer than training.maxSeqLength {max_length} tokens"
                " (prompt + response): raise maxSeqLength, or shorten the pairs"
            ]
        )


def reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's reward-model figures: the last training and validation reward accuracy and
    margin, and their history by step."""
    return preference.reward_metrics(log_history, REWARD_METRICS)
