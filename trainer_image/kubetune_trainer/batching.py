"""Batches with little padding, and the check that no row attends to another.

Length-grouped order: shuffle, sort each window of :data:`WINDOW_BATCHES` batches by length, cut
it into batches, shuffle the batches (the longest first, so an out-of-memory shows at step one).
Written here rather than taken from transformers' ``LengthGroupedSampler`` because that one
fixes the window at 50 batches (7 % padding on a long-tailed dataset, against about 1 % here) and
leaves each window's batches in descending length, a curriculum from long rows to short ones.

:func:`check_rows_kept_apart` runs before the first step of a padding-free run: the second of two
flattened rows must not change when the first one does. It catches any model or attention path
that attends across rows (a remote-code model without transformers' packed-sequence masks, a
model config with ``use_cache`` on) before any GPU time is spent on contaminated batches.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any, Final

from .errors import InvalidConfigError

log = logging.getLogger(__name__)

#: Batches sorted together: larger means less padding and less randomness in which rows share a batch.
WINDOW_BATCHES: Final = 256
#: Largest logit change of the probed row that still counts as "unchanged" (float noise).
BOUNDARY_TOLERANCE: Final = 1e-3


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int) -> list[int]:
    """Row indices whose consecutive ``batch_size`` slices hold rows of similar length."""
    rng = random.Random(seed)  # noqa: S311 - a data order, not a secret
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    window = batch_size * WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(indices), window):
        part = sorted(indices[start : start + window], key=lambda i: lengths[i])  # stable: ties stay shuffled
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch]


def padding_waste(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """The fraction of the tokens computed that are padding, with each batch padded to its longest row."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded if padded else 0.0


def random_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)  # noqa: S311 - a data order, not a secret
    return order


def expected_padding_waste(batching: str, lengths: Sequence[int], batch_size: int, seed: int) -> float:
    """The padding share of the first epoch's batches: exact for length-grouped (the sampler's own
    order), for padded that of an equally random order, none for padding-free (rows flattened)."""
    if batching == "padding-free" or not lengths:
        return 0.0
    if batching == "length-grouped":
        return padding_waste(lengths, length_grouped_order(lengths, batch_size, seed), batch_size)
    return padding_waste(lengths, random_order(len(lengths), seed), batch_size)


class LengthGroupedSampler:
    """A torch ``Sampler`` over :func:`length_grouped_order`; ``set_epoch`` (called by accelerate)
    gives each epoch its own order, the same again on a resumed run."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))


def row_lengths(dataset: Any) -> list[int]:
    """Token counts of a tokenized (TRL-prepared) dataset's rows."""
    return [len(ids) for ids in dataset["input_ids"]]


@cache
def length_grouped(trainer_class: type, lengths: Callable[[Any], list[int]]) -> type:
    """``trainer_class`` (any transformers Trainer: TRL's SFT, DPO, ORPO and reward trainers,
    transformers' own for classification) whose training batches come in length-grouped order, by
    the ``lengths`` of its prepared training rows. Named ``LengthGrouped`` + the class's name."""

    class LengthGrouped(trainer_class):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return LengthGroupedSampler(
                lengths(dataset), self.args.per_device_train_batch_size, self.args.seed
            )

    LengthGrouped.__name__ = LengthGrouped.__qualname__ = f"LengthGrouped{trainer_class.__name__}"
    return LengthGrouped


def length_grouped_trainer_class() -> type:
    """TRL's SFTTrainer whose training batches come in length-grouped order."""
    from trl.trainer.sft_trainer import SFTTrainer

    return length_grouped(SFTTrainer, row_lengths)


@cache
def padding_free_trainer_class() -> type:
    """TRL's SFTTrainer for flattened rows without packing, truncating each row itself.

    TRL 1.16 refuses ``padding_free`` with a ``max_length`` unless packing, so the SFTConfig gets
    none and this truncates the prepared rows as TRL's own preparation does (keep the start, drop
    rows left with no label).
    """
    from trl.trainer.sft_trainer import SFTTrainer

    class PaddingFreeSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, max_row_length: int, **kwargs: Any) -> None:
            self.max_row_length = max_row_length  # read by _prepare_dataset, inside __init__
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            prepared = super()._prepare_dataset(dataset, *args, **kwargs)
            keep = slice(None, self.max_row_length)
            truncated = prepared.map(
                lambda row: {"input_ids": row["input_ids"][keep], "labels": row["labels"][keep]}
            )
            return truncated.filter(lambda row: any(label != -100 for label in row["labels"]))

    return PaddingFreeSFTTrainer


def check_rows_kept_apart(model: Any, collator: Any, attention: str) -> None:
    """Refuse (exit 43) a padding-free run whose model lets a flattened row attend to the one before.

    The model runs as training runs it (its own ``use_cache`` setting, the training collator), in
    eval mode so dropout does not move the logits.
    """
    import torch

    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    first, other_first, second = (
        torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (6, 6, 5)
    )
    device = next(model.parameters()).device

    def second_row_logits(before: list[int]) -> Any:
        batch = collator([{"input_ids": before}, {"input_ids": second}])
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits[0, len(before) :].float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            after_first, after_other = second_row_logits(first), second_row_logits(other_first)
    finally:
        model.train(was_training)
    change = float((after_first - after_other).abs().max().item())
    tolerance = BOUNDARY_TOLERANCE * max(1.0, float(after_first.abs().max().item()))
    log.info("batching: padding-free rows kept apart (probe change %.2e, tolerance %.2e)", change, tolerance)
    if change > tolerance:
        raise InvalidConfigError(
            f"training.batching padding-free (or packing): with attention {attention}, this model lets a"
            f" row attend to the row before it in a flattened batch (its logits moved by {change:.3g});"
            " set training.batching to length-grouped (or auto) and packing to false"
        )
