"""The ORPO glue: ``training`` + ``orpo`` -> ``ORPOConfig``, and TRL's ``ORPOTrainer``.

ORPO (odds ratio preference optimization) trains on the same preference pairs as DPO, but
needs no reference model: its loss is the supervised loss on the chosen response plus ``beta``
times an odds-ratio term that favours the chosen over the rejected one. So it can start from a
base model without an SFT run first, and holds one model in memory whatever the method.

TRL 1.16 keeps it in ``trl.experimental.orpo``, whose import warns (``TRLExperimentalWarning``)
that the API may change: that warning is for code written against TRL; kubetune pins TRL, maps
the config by a declared table (:mod:`.preference`, checked against ORPOConfig's fields by
tests/trainer/test_orpo_kto.py) and silences it, logging once where ORPO comes from.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import OrpoSpec, TrainingSpec

from . import batching, preference, reporting, sft, throughput

log = logging.getLogger(__name__)

#: ``training`` fields that do not reach ORPOConfig, and why (each refused at apply time).
NOT_APPLICABLE: Final = {"packing": preference.NO_PACKING}
#: ``training`` fields that reach the trainer through the order of its rows, not its config.
BY_ROW_ORDER: Final = {
    "batching": "length-grouped: kubetune's sampler over the prompt and longer response; padded: TRL's own"
}
#: ``orpo`` fields -> the ORPOConfig argument each sets.
ORPO_SECTION: Final = {"beta": "beta"}
#: TRL's logged ORPO metrics -> their metrics.json names: the rewards (beta times the mean
#: log-probability of each response under the policy) as status.progress names them, and the
#: odds-ratio term's log-sigmoid (rises towards 0 as the chosen responses win).
REWARD_METRICS: Final = {**reporting.REWARD_PROGRESS, "log_odds_ratio": "logOddsRatio"}


@cache
def _experimental() -> tuple[type, type]:
    with warnings.catch_warnings():
        from trl.import_utils import TRLExperimentalWarning

        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    log.info("objective orpo: TRL's ORPOTrainer (trl.experimental.orpo, TRL's experimental namespace)")
    return ORPOConfig, ORPOTrainer


def config_class() -> type:
    return _experimental()[0]


def same_named(training: TrainingSpec) -> dict[str, Any]:
    """The ``training`` fields ORPOConfig takes under their own (snake_case) names."""
    return sft.passed_as_is(training, config_class(), NOT_APPLICABLE.keys())


def section(spec: OrpoSpec) -> dict[str, Any]:
    """The arguments of :data:`ORPO_SECTION`."""
    return {ORPO_SECTION["beta"]: spec.beta}


def orpo_config(training: TrainingSpec, spec: OrpoSpec | None, plan: sft.Plan, output_dir: Path) -> Any:
    return preference.build_config(
        config_class(),
        training,
        plan,
        output_dir,
        section=section(spec or OrpoSpec()),
        not_applicable=NOT_APPLICABLE,
    )


def pair_lengths(dataset: Any) -> list[int]:
    """Token counts of a TRL-prepared ORPO dataset: its chosen and rejected rows hold the prompt,
    and a pair is padded to the longer one."""
    pairs = zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
    return [max(len(chosen), len(rejected)) for chosen, rejected in pairs]


def trainer_class(speed: throughput.ThroughputPlan) -> type:
    """Length-grouped (kubetune's sampler over :func:`pair_lengths`) or TRL's own (padded, random
    order) ORPOTrainer."""
    trainer: type = _experimental()[1]
    if speed.batching == "length-grouped":
        return batching.length_grouped(trainer, pair_lengths)
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
    """The ORPOTrainer: no reference model to give (ORPO has none)."""
    train_ds, eval_ds = datasets
    return trainer_class(speed)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's ORPO figures: the last logged training and evaluation rewards and log-odds
    ratio, and their history by step."""
    return preference.reward_metrics(log_history, REWARD_METRICS)
