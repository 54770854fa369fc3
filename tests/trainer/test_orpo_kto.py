"""objectives orpo and kto: their configs from the declared map, KTO's row order, and one real run
of each through the entrypoint (tiny Llama, data and output in the local S3 server) whose adapter
loads with peft and prefers the better responses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_api.spec import KtoSpec, ModelSpec, OrpoSpec, TrainingSpec
from kubetune_api.trainer import TrainerConfig
from kubetune_localenv.tinymodel import COLORS
from kubetune_trainer import batching, kto, modeling, orpo, sft
from kubetune_trainer.reporting import JobRef

from .conftest import TrainerRun, build_tokenizer, to_jsonl, upload_folder
from .test_dpo import CPU_PLAN, _get, preference_records, published_margins

SECTIONS: dict[str, tuple[ModuleType, dict[str, str], type[OrpoSpec | KtoSpec]]] = {
    "orpo": (orpo, orpo.ORPO_SECTION, OrpoSpec),
    "kto": (kto, kto.KTO_SECTION, KtoSpec),
}


def unpaired_records(n: int) -> list[dict[str, Any]]:
    """KTO records over the tiny tokenizer's words: the next color is desirable, the color before
    undesirable (one of each per prompt)."""
    records: list[dict[str, Any]] = []
    for i in range(n // 2):
        color, after, before = COLORS[i % 8], COLORS[(i + 1) % 8], COLORS[(i - 1) % 8]
        records.append({"prompt": f"after {color} comes", "completion": f" {after}", "label": True})
        records.append({"prompt": f"after {color} comes", "completion": f" {before}", "label": False})
    return records


# -- the declared maps -----------------------------------------------------------------------------
@pytest.mark.parametrize("objective", sorted(SECTIONS))
def test_every_training_field_reaches_the_config_or_is_declared(objective: str) -> None:
    module, section, spec_class = SECTIONS[objective]
    config_fields = sft.config_fields(module.config_class())
    fields = set(TrainingSpec.model_fields)
    passed = set(module.same_named(TrainingSpec()))
    translated = set(sft.TRANSLATED)
    elsewhere = sft.READ_AT_LOAD | module.NOT_APPLICABLE.keys()
    assert not passed & (translated | elsewhere)
    assert fields == passed | translated | elsewhere, (
        f"reach neither the config nor a translation: {fields - passed - translated - elsewhere}"
    )
    for name, arguments in sft.TRANSLATED.items():  # a translation lands on the config, or the order
        if name in module.BY_ROW_ORDER:
            assert not set(arguments) & config_fields, name
        else:
            assert set(arguments) <= config_fields, name
    assert set(spec_class.model_fields) == set(section)
    assert set(section.values()) <= config_fields


def test_orpo_config_carries_the_spec_the_section_and_the_plan(tmp_path: Path) -> None:
    spec = TrainingSpec.model_validate({"maxSeqLength": 128, "learningRate": 0.001, "maxSteps": 9})
    args = orpo.orpo_config(spec, OrpoSpec(beta=0.3), CPU_PLAN, tmp_path)
    assert (args.max_length, args.learning_rate, args.max_steps, args.beta) == (128, 0.001, 9, 0.3)
    # TRL's ORPOConfig defaults (bf16, gradient checkpointing on, lr 1e-6) do not leak through.
    assert (args.bf16, args.fp16, args.use_cpu, args.activation_checkpointing) == (False, False, True, False)
    assert args.report_to == []
    defaults = orpo.orpo_config(TrainingSpec(), None, CPU_PLAN, tmp_path)
    assert (defaults.beta, defaults.learning_rate) == (0.1, 2e-4)


def test_kto_config_carries_the_spec_the_section_and_the_plan(tmp_path: Path) -> None:
    spec = TrainingSpec.model_validate({"maxSeqLength": 96, "warmupRatio": 0.1, "seed": 7})
    section = KtoSpec(beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    args = kto.kto_config(spec, section, CPU_PLAN, tmp_path)
    assert (args.max_length, args.warmup_steps, args.seed) == (96, 0.1, 7)
    assert (args.beta, args.desirable_weight, args.undesirable_weight) == (0.2, 1.5, 0.5)
    assert (args.loss_type, args.train_sampling_strategy) == ("kto", "sequential")  # KL batches
    assert (args.bf16, args.use_cpu, args.activation_checkpointing, args.report_to) == (
        False,
        True,
        False,
        [],
    )
    defaults = kto.kto_config(TrainingSpec(), None, CPU_PLAN, tmp_path)
    assert (defaults.beta, defaults.desirable_weight, defaults.learning_rate) == (0.1, 1.0, 2e-4)


def test_kto_needs_two_rows_a_batch() -> None:
    """A batch of one is refused by the config (and at apply time: spec.KTO_NEEDS_BATCHES)."""
    one = {"perDeviceTrainBatchSize": 1, "gradientAccumulationSteps": 8}
    with pytest.raises(ValidationError, match="perDeviceTrainBatchSize to 2 or more"):
        TrainerConfig.model_validate(
            {
                "model": {"source": "s3://models/tiny"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://out/run"},
                "objective": "kto",
                "training": one,
            }
        )


def test_kto_rows_are_ordered_before_trl_reads_them_in_sequence() -> None:
    """length-grouped: consecutive batches of similar length (kubetune's order over the tokens);
    padded: shuffled, the same for the same seed."""
    tokenizer = build_tokenizer()
    words = " ".join(COLORS)
    rows = [
        {
            "prompt": "after red comes",
            "completion": " " + " ".join([words] * (i % 4 + 1)),
            "label": i % 2 == 0,
        }
        for i in range(16)
    ]
    grouped = kto.row_order(rows, tokenizer, CPU_PLAN.speed, 4, seed=3)
    assert sorted(grouped) == list(range(16))
    for start in range(0, 16, 4):  # four lengths, four rows of each: one length a batch
        assert len({i % 4 for i in grouped[start : start + 4]}) == 1, grouped
    padded = dataclasses.replace(CPU_PLAN.speed, batching="padded")
    shuffled = kto.row_order(rows, tokenizer, padded, 4, seed=3)
    assert shuffled == batching.random_order(16, 3) != list(range(16))


def test_reward_metrics_of_orpo_and_kto() -> None:
    history: list[dict[str, Any]] = [
        {
            "step": 1,
            "loss": 1.0,
            "rewards/chosen": -0.4,
            "rewards/rejected": -0.5,
            "rewards/margins": 0.1,
            "rewards/accuracies": 0.5,
            "log_odds_ratio": -0.7,
            "kl": 0.0,
        },
        {"step": 2, "eval_loss": 0.9, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2},
        {"step": 2, "loss": 0.8, "rewards/chosen": -0.3, "rewards/margins": 0.3, "kl": 0.01},
    ]
    for_orpo = orpo.reward_metrics(history)
    assert (for_orpo["rewardAccuracy"], for_orpo["logOddsRatio"], for_orpo["rewardMargin"]) == (
        0.5,
        -0.7,
        0.3,
    )
    assert (for_orpo["evalRewardAccuracy"], for_orpo["evalRewardMargin"]) == (0.75, 0.2)
    assert [e["step"] for e in for_orpo["rewardHistory"]] == [1, 2]
    for_kto = kto.reward_metrics(history)
    assert "rewardAccuracy" not in for_kto  # KTO's records are not pairs
    assert (for_kto["rewardChosen"], for_kto["rewardRejected"], for_kto["kl"]) == (-0.3, -0.5, 0.01)
    assert set(for_kto["rewardHistory"][1]) == {"step", "rewards/chosen", "rewards/margins", "kl"}


@pytest.mark.slow
def test_kto_reads_chat_records_in_kubetunes_order_with_the_base_as_reference(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Conversational records reach TRL as they are (the chat template renders them), in
    row_order's order, each batch's KL completions taken from its own rows; the reference is the
    base with the adapter disabled (no reference model, no copied adapter)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), ModelSpec(source="org/tiny"))  # + template
    rows = [  # completions of 1 to 3 words, so that the order matters
        {
            "prompt": [{"role": "user", "content": f"what follows {r['prompt'].split()[1]}"}],
            "completion": [{"role": "assistant", "content": r["completion"].strip() + " red" * (i % 3)}],
            "label": r["label"],
        }
        for i, r in enumerate(unpaired_records(12))
    ]
    args = kto.kto_config(TrainingSpec(), None, CPU_PLAN, tmp_path)
    trainer = kto.build_trainer(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        tokenizer=tokenizer,
        args=args,
        datasets=(Dataset.from_list(rows), None),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[],
        speed=CPU_PLAN.speed,
    )
    assert trainer.ref_model is None
    assert isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]
    prepared = trainer.train_dataset
    order = kto.row_order(Dataset.from_list(rows), tokenizer, CPU_PLAN.speed, 4, args.seed)
    assert prepared["label"] == [rows[i]["label"] for i in order]
    prompt = tokenizer.decode(prepared["prompt_ids"][0]).replace(" ", "")  # rendered by the template,
    assert prompt.startswith("<|user|>")
    assert prompt.endswith("<|assistant|>")  # with its generation prompt
    completions, kl = prepared["completion_ids"], prepared["KL_completion_ids"]
    for start in range(0, len(order), 4):  # rotated by one within each batch of 4
        batch = completions[start : start + 4]
        assert kl[start : start + 4] == [batch[-1], *batch[:-1]]
    lengths = [len(p) + len(c) for p, c in zip(prepared["prompt_ids"], completions, strict=True)]
    assert kto.padding_waste(prepared, 4) == batching.padding_waste(lengths, range(len(lengths)), 4)


# -- a run of each through the entrypoint ----------------------------------------------------------
def _metrics(s3_client: Any, bucket: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    return loaded


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.s3
@pytest.mark.slow
def test_orpo_trains_a_lora_adapter_and_publishes_its_metrics(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    """ORPO on text pairs with method lora (no quantization, no reference model): its reward and
    odds-ratio metrics in metrics.json, and an adapter that widens the chosen-over-rejected margin."""
    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(preference_records(32)))
    run.config.update(objective="orpo", orpo={"beta": 2.0}, method="lora")
    run.config["dataset"]["validationSplit"] = 0.25  # format auto: detected as preference
    # The supervised term leads at first: this tiny model needs 24 steps to rank the pairs.
    run.config["training"].update(maxSteps=24, saveSteps=24, evalStrategy="steps", evalSteps=12)

    code, log = run.run()
    assert code == 0, log
    assert "dataset: format preference (detected), 32 train / 0 validation records" in log
    assert "batching: length-grouped" in log
    assert "trl.experimental.orpo" in log
    assert "You are importing from 'trl.experimental'" not in log  # TRL's warning is silenced

    metrics = _metrics(s3_client, bucket)
    assert (metrics["objective"], metrics["datasetFormat"], metrics["globalStep"]) == (
        "orpo",
        "preference",
        24,
    )
    names = ("rewardAccuracy", "rewardMargin", "rewardChosen", "rewardRejected", "logOddsRatio")
    for name in (*names, "evalRewardAccuracy", "evalLogOddsRatio", "evalLoss"):
        assert isinstance(metrics[name], float), name
    history = metrics["rewardHistory"]
    assert [e["step"] for e in history] == list(range(1, 25))
    assert set(history[0]) == {"step", *orpo.REWARD_METRICS}
    assert metrics["logOddsRatio"] == history[-1]["log_odds_ratio"]
    assert history[-1]["log_odds_ratio"] > history[0]["log_odds_ratio"], history  # chosen winning
    summary = json.loads(run.termination_path.read_text())
    assert (summary["objective"], summary["rewardMargin"]) == ("orpo", metrics["rewardMargin"])
    adapter = json.loads(_get(s3_client, bucket, "out/job-1/adapter_config.json"))
    assert adapter["peft_type"] == "LORA"

    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in preference_records(8)]
    before, after = published_margins(s3_client, bucket, tiny_model_dir, run.work, pairs)
    assert after != before
    assert _mean(after) > _mean(before) + 0.1, (before, after)


@pytest.mark.s3
@pytest.mark.slow
def test_kto_trains_a_qlora_adapter_with_live_reward_progress(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    """KTO on unpaired text records with method qlora (4-bit base on CPU), the reference being the
    base with the adapter disabled: its metrics in metrics.json and live in a real FineTuneJob's
    status, and an adapter that prefers the desirable completions."""
    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(unpaired_records(32)))
    run.config.update(objective="kto", kto={"beta": 2.0, "desirableWeight": 1.2})
    run.config["dataset"]["validationSplit"] = 0.25  # format auto: detected as unpaired_preference
    # As for ORPO: 24 steps (KTO's signal per record is weaker than a pair's).
    run.config["training"].update(maxSteps=24, saveSteps=24, evalStrategy="steps", evalSteps=12)
    job: JobRef = request.getfixturevalue("finetunejob")
    run.env["KUBECONFIG"] = str(request.getfixturevalue("local_env").kubeconfig)
    run.config["reporting"].update(name=job.name, namespace=job.namespace, intervalSeconds=0.5)

    code, log = run.run()
    assert code == 0, log
    assert "dataset: format unpaired_preference (detected), 32 train / 0 validation records" in log
    assert "batching: length-grouped" in log

    metrics = _metrics(s3_client, bucket)
    assert (metrics["objective"], metrics["datasetFormat"], metrics["globalStep"]) == (
        "kto",
        "unpaired_preference",
        24,
    )
    for name in ("rewardMargin", "rewardChosen", "rewardRejected", "kl", "evalRewardMargin", "evalLoss"):
        assert isinstance(metrics[name], float), name
    assert "rewardAccuracy" not in metrics  # unpaired records have no pairs to rank
    history = metrics["rewardHistory"]
    assert [e["step"] for e in history] == list(range(1, 25))
    margins = [e["rewards/margins"] for e in history if "rewards/margins" in e]
    assert _mean(margins[-4:]) > _mean(margins[:4]), history  # desirable rewards pull ahead
    assert 0.0 <= metrics["paddingWaste"] < 0.5

    from kubernetes import client

    obj: Any = client.CustomObjectsApi(request.getfixturevalue("kube_api")).get_namespaced_custom_object(
        GROUP, VERSION, job.namespace, PLURAL, job.name
    )
    progress = obj["status"]["progress"]
    assert progress["step"] == 24
    assert progress["rewardMargin"] == round(metrics["rewardMargin"], 4)
    assert {"rewardChosen", "rewardRejected", "evalLoss"} <= set(progress)
    assert "rewardAccuracy" not in progress

    good_and_bad = unpaired_records(16)
    pairs = [
        (good["prompt"], good["completion"], bad["completion"])
        for good, bad in zip(good_and_bad[::2], good_and_bad[1::2], strict=True)
    ]
    before, after = published_margins(s3_client, bucket, tiny_model_dir, run.work, pairs)
    assert after != before
    assert _mean(after) > _mean(before) + 0.1, (before, after)
