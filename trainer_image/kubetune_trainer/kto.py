"""The KTO glue: ``training`` + ``kto`` -> ``KTOConfig``, the order of the rows, and TRL's
``KTOTrainer``.

KTO (Kahneman-Tversky optimization) trains on unpaired records: a prompt, one completion and
whether it is desirable (dataset.format unpaired_preference). It raises the desirable
completions' reward and lowers the undesirable ones', each against a KL estimate of how far the
policy has moved from the reference. The reference is the frozen base: with a peft adapter,
``KTOTrainer`` gets ``ref_model=None`` and scores the reference with the adapter disabled, on
the same weights (no second copy of the model in memory).

The KL estimate pairs each prompt with another row's completion of the same batch: TRL builds
those pairs when it prepares the data, batch by batch in the dataset's order, and then reads the
rows in that order (``train_sampling_strategy="sequential"``). So kubetune batches KTO by ordering
the rows before TRL sees them, never by a sampler: length-grouped puts rows of similar length
next to each other (:func:`batching.length_grouped_order`), padded shuffles them (TRL alone
would keep the file's order: a file sorted by label would train on batches of one label).
The order is the same every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import KtoSpec, TrainingSpec

from . import batching, dataset, preference, reporting, sft, throughput

#: ``training`` fields that do not reach KTOConfig, and why (each refused at apply time).
NOT_APPLICABLE: Final = {"packing": preference.NO_PACKING}
#: ``training`` fields that reach the trainer through the order of its rows, not its config.
BY_ROW_ORDER: Final = {
    "batching": "length-grouped or padded (shuffled): the rows' order, read in sequence by TRL"
}
#: ``kto`` fields -> the KTOConfig argument each sets.
KTO_SECTION: Final = {
    "beta": "beta",
    "desirable_weight": "desirable_weight",
    "undesirable_weight": "undesirable_weight",
}
#: TRL's logged KTO metrics -> their metrics.json names: the mean rewards (beta times the
#: log-probability ratio of policy to reference) of the desirable (chosen) and undesirable
#: (rejected) completions, as status.progress names them, and the KL estimate. KTO logs no
#: accuracy: its records are not pairs.
REWARD_METRICS: Final = {
    **{k: v for k, v in reporting.REWARD_PROGRESS.items() if k != "rewards/accuracies"},
    "kl": "kl",
}


def config_class() -> type:
    from trl.trainer.kto_config import KTOConfig

    return KTOConfig


def same_named(training: TrainingSpec) -> dict[str, Any]:
    """The ``training`` fields KTOConfig takes under their own (snake_case) names."""
    return sft.passed_as_is(training, config_class(), NOT_APPLICABLE.keys())


def section(spec: KtoSpec) -> dict[str, Any]:
    """The arguments of :data:`KTO_SECTION`."""
    return {argument: getattr(spec, field) for field, argument in KTO_SECTION.items()}


def kto_config(
    training: TrainingSpec,
    spec: KtoSpec | None,
    plan: sft.Plan,
    output_dir: Path,
    reference: Mapping[str, Any] | None = None,
) -> Any:
    """The KTOConfig; ``reference``: from_pretrained's arguments for the reference copy TRL loads
    when no adapter trains (modeling.reference_init_kwargs)."""
    return preference.build_config(
        config_class(),
        training,
        plan,
        output_dir,
        section=section(spec or KtoSpec()),
        not_applicable=NOT_APPLICABLE,
        reference=reference,
    )


def row_order(
    rows: Any, tokenizer: Any, speed: throughput.ThroughputPlan, batch_size: int, seed: int
) -> list[int]:
    """The order TRL reads the training rows in: length-grouped by their tokens, or shuffled."""
    if speed.batching != "length-grouped":
        return batching.random_order(len(rows), seed)
    texts = [dataset.example_text(row, tokenizer) for row in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return batching.length_grouped_order(lengths, batch_size, seed)


def row_lengths(prepared: Any) -> list[int]:
    """Token counts of a TRL-prepared KTO dataset's rows (prompt and completion)."""
    return [len(p) + len(c) for p, c in zip(prepared["prompt_ids"], prepared["completion_ids"], strict=True)]


def padding_waste(prepared: Any, batch_size: int) -> float:
    """The padding share of the first epoch's batches: exact, the rows being read in order."""
    lengths = row_lengths(prepared)
    return batching.padding_waste(lengths, range(len(lengths)), batch_size)


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
    """The KTOTrainer over the ordered training rows; ``ref_model=None`` with ``peft_config``:
    the reference is the base model with the adapter disabled."""
    from trl.trainer.kto_trainer import KTOTrainer

    train_ds, eval_ds = datasets
    preference.log_reference("kto", args, peft_config)
    order = row_order(train_ds, tokenizer, speed, args.per_device_train_batch_size, args.seed)
    return KTOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train_ds.select(order),
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def reward_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics.json's KTO figures: the last logged training and evaluation rewards and KL
    estimate, and their history by step."""
    return preference.reward_metrics(log_history, REWARD_METRICS)
