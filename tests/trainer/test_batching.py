"""Batches with little padding, equal losses on every batching path, and the cross-row probe."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import TrainingSpec
from kubetune_localenv.tinymodel import text_records
from kubetune_trainer import batching
from kubetune_trainer.errors import InvalidConfigError

from .conftest import TrainerRun, to_jsonl, upload_folder


def _sampled_lengths(trainer_class: type, rows: dict[str, list[list[int]]], batch_size: int) -> list[int]:
    """The lengths a trainer class's training sampler orders the rows by (no trainer built: only
    the attributes ``_get_train_sampler`` reads)."""
    from datasets import Dataset

    trainer: Any = object.__new__(trainer_class)
    trainer.train_dataset = Dataset.from_dict(rows)
    trainer.args = type("Args", (), {"per_device_train_batch_size": batch_size, "seed": 0})()
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, batching.LengthGroupedSampler)
    assert sampler.batch_size == batch_size
    return list(sampler.lengths)


def test_every_length_grouped_trainer_samples_by_its_own_rows() -> None:
    """Each objective's length-grouped trainer class orders the rows by the lengths its collator
    pads to: SFT and classification by the row, DPO by the prompt and longer response, ORPO and
    reward by the longer of the two rows."""
    from kubetune_trainer import classification, dpo, orpo, reward, sft, throughput
    from kubetune_trainer.hardware import Hardware, PrecisionChoice

    cpu = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
    none = throughput.Installed(flash_attn=False, liger_kernel=False)
    speed = throughput.plan(TrainingSpec(), "lora", cpu, PrecisionChoice("fp32", "test"), none)
    assert speed.batching == "length-grouped"
    rows = {"input_ids": [[1] * 3, [1] * 5]}
    pairs = {"prompt_ids": [[1] * 2, [1]], "chosen_ids": [[1] * 4, [1]], "rejected_ids": [[1], [1] * 6]}
    orpo_pairs = {"chosen_input_ids": [[1] * 4, [1]], "rejected_input_ids": [[1], [1] * 6]}
    assert _sampled_lengths(sft.trainer_class(speed), rows, 2) == [3, 5]
    assert _sampled_lengths(classification.trainer_class(speed), rows, 2) == [3, 5]
    assert _sampled_lengths(dpo.trainer_class(speed), pairs, 2) == [6, 7]
    assert _sampled_lengths(orpo.trainer_class(speed), orpo_pairs, 2) == [4, 6]
    assert _sampled_lengths(reward.trainer_class(speed), pairs, 2) == [4, 6]
    assert classification.trainer_class(speed).__name__ == "LengthGroupedTrainer"
    assert sft.trainer_class(speed).__name__ == "LengthGroupedSFTTrainer"


def long_tailed_lengths(count: int, seed: int = 0) -> list[int]:
    """Row lengths like chat and instruction data: most short, a few long (log-normal, capped)."""
    rng = random.Random(seed)
    return [min(1024, max(8, int(rng.lognormvariate(4.5, 0.8)))) for _ in range(count)]


# -- the order ---------------------------------------------------------------------------------------
def test_length_grouped_order_is_a_permutation_with_little_padding() -> None:
    lengths = long_tailed_lengths(2000)
    order = batching.length_grouped_order(lengths, batch_size=8, seed=1)
    assert sorted(order) == list(range(len(lengths)))
    grouped = batching.padding_waste(lengths, order, 8)
    padded = batching.padding_waste(lengths, batching.random_order(len(lengths), 1), 8)
    assert grouped < 0.02
    assert padded > 0.3


def test_batches_come_in_random_length_order_with_the_longest_first() -> None:
    lengths = long_tailed_lengths(800)
    order = batching.length_grouped_order(lengths, batch_size=8, seed=3)
    batch_maxima = [max(lengths[i] for i in order[s : s + 8]) for s in range(0, len(order), 8)]
    assert batch_maxima[0] == max(lengths)
    rising = sum(b > a for a, b in itertools.pairwise(batch_maxima[1:]))
    assert 0.3 < rising / (len(batch_maxima) - 2) < 0.7  # neither long-to-short nor short-to-long


def test_each_epoch_has_its_own_order_and_a_resumed_run_the_same() -> None:
    lengths = long_tailed_lengths(300)
    sampler = batching.LengthGroupedSampler(lengths, batch_size=4, seed=42)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    resumed = batching.LengthGroupedSampler(lengths, batch_size=4, seed=42)
    resumed.set_epoch(1)
    assert first != second
    assert list(resumed) == second
    assert len(sampler) == 300


def test_expected_padding_waste_per_batching() -> None:
    lengths = long_tailed_lengths(400)
    assert batching.expected_padding_waste("padding-free", lengths, 8, 0) == 0.0
    assert batching.expected_padding_waste("length-grouped", lengths, 8, 0) < 0.05
    assert batching.expected_padding_waste("padded", lengths, 8, 0) > 0.3
    assert batching.expected_padding_waste("padded", [], 8, 0) == 0.0


# -- every path computes the same per-row loss as the row alone -------------------------------------
ROWS = [[5, 9, 14, 3, 22, 7, 8, 31], [11, 4, 6], [17, 2, 28, 19, 5], [13, 21, 9, 30, 12, 6, 4, 10, 18, 3, 25]]


def tiny_llama(attention: str, use_cache: bool = False) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=use_cache,
    )
    config._attn_implementation = attention
    model: Any = LlamaForCausalLM(config)
    return model.eval()


def row_losses(logits: Any, ids: list[int]) -> float:
    """Summed next-token cross-entropy of one row from its own logits."""
    import torch

    target = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(logits[: len(ids) - 1], target, reduction="sum"))


def alone(model: Any) -> list[float]:
    import torch

    with torch.no_grad():
        return [row_losses(model(input_ids=torch.tensor([ids])).logits[0], ids) for ids in ROWS]


def padded(model: Any) -> list[float]:
    """TRL's padding collator, rows padded to the longest with an attention mask."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0)([{"input_ids": ids} for ids in ROWS])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return [row_losses(logits[n], ids) for n, ids in enumerate(ROWS)]


def flattened(model: Any, rows: list[list[int]], seq_lengths: list[int] | None = None) -> list[float]:
    """TRL's padding-free collator (the training path): one row, position ids, no attention mask."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    example: dict[str, Any] = {"input_ids": [t for ids in rows for t in ids]}
    if seq_lengths is not None:
        example["seq_lengths"] = seq_lengths
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([example] if seq_lengths is not None else [{"input_ids": ids} for ids in rows])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    losses, start = [], 0
    for ids in rows:
        losses.append(row_losses(logits[start : start + len(ids)], ids))
        start += len(ids)
    return losses


def packed(model: Any) -> list[float]:
    """TRL's best-fit packing (training.packing) into one sequence, then the padding-free collator."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    pack = pack_dataset(Dataset.from_list([{"input_ids": ids} for ids in ROWS]), seq_length=64)
    assert len(pack) == 1
    lengths = list(pack[0]["seq_lengths"])
    # bfd packs the longest first: the rows' lengths differ, so they say which row is where.
    by_length = {len(ids): ids for ids in ROWS}
    rows = [by_length[n] for n in lengths]
    assert [t for ids in rows for t in ids] == list(pack[0]["input_ids"])
    losses = dict(zip(map(tuple, rows), flattened(model, rows, lengths), strict=True))
    return [losses[tuple(ids)] for ids in ROWS]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "path", [padded, lambda m: flattened(m, ROWS), packed], ids=["padded", "padding-free", "packed"]
)
def test_each_batching_path_gives_each_row_the_loss_it_has_alone(attention: str, path: Any) -> None:
    model = tiny_llama(attention)
    expected, got = alone(model), path(model)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) for a, b in zip(expected, got, strict=True)), (
        expected,
        got,
    )


def test_a_flattened_batch_with_a_kv_cache_attends_across_rows() -> None:
    """The negative control: with use_cache on, transformers skips the block-diagonal mask."""
    model = tiny_llama("sdpa", use_cache=True)
    expected, got = alone(model), flattened(model, ROWS)
    assert math.isclose(expected[0], got[0], rel_tol=1e-5)  # the first row has nothing before it
    assert not math.isclose(expected[1], got[1], rel_tol=1e-3)


# -- the probe before the first step -------------------------------------------------------------------
def padding_free_collator() -> Any:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_probe_passes_a_model_that_keeps_rows_apart(attention: str) -> None:
    model = tiny_llama(attention).train()
    batching.check_rows_kept_apart(model, padding_free_collator(), attention)
    assert model.training  # the probe restores the mode


def test_the_probe_refuses_a_model_that_attends_across_rows() -> None:
    model = tiny_llama("sdpa", use_cache=True)
    with pytest.raises(InvalidConfigError, match=r"set training\.batching to length-grouped"):
        batching.check_rows_kept_apart(model, padding_free_collator(), "sdpa")


# -- through the real entrypoint ------------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({}, ("length-grouped", False)),  # the CPU default
        ({"batching": "padding-free"}, ("padding-free", True)),
        ({"packing": True}, ("padding-free", True)),
        ({"batching": "padded"}, ("padded", False)),
    ],
    ids=["auto", "padding-free", "packing", "padded"],
)
def test_each_batching_trains_through_the_entrypoint(
    trainer_run: TrainerRun,
    s3_client: Any,
    tiny_model_dir: Path,
    training: dict[str, Any],
    expected: tuple[str, bool],
) -> None:
    """expected: the batching metrics.json names, and whether the cross-row probe ran."""
    batching_used, probed = expected
    run = trainer_run
    upload_folder(s3_client, tiny_model_dir, run.bucket, "models/tiny")
    records = [{"text": r["text"] * (1 + n % 5)} for n, r in enumerate(text_records(24))]
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(records))
    run.config["method"] = "lora"
    run.config["training"].update(maxSteps=3, saveSteps=3, **training)
    code, log = run.run()
    assert code == 0, log
    metrics = json.loads(s3_client.get_object(Bucket=run.bucket, Key="out/job-1/metrics.json")["Body"].read())
    assert metrics["batching"] == batching_used
    assert metrics["attnImplementation"] == "sdpa"
    assert ("padding-free rows kept apart" in log) is probed
    if batching_used == "padding-free":
        assert metrics["paddingWaste"] == 0.0
    assert metrics["globalStep"] == 3
