"""Task sequence-classification and objective reward: the label set, the metrics, the declared
maps to TrainingArguments and RewardConfig, and real runs through the entrypoint (tiny Llama with
a fresh head, data and output in the local S3 server) whose outputs load back and predict what the
trainer's own evaluation saw."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_api.spec import DatasetSpec, FieldMapping, TrainingSpec
from kubetune_localenv.tinymodel import COLORS
from kubetune_trainer import classification, dataset, labels, reporting, reward, sft, throughput
from kubetune_trainer.errors import InvalidDataError
from kubetune_trainer.formats import check_record, detect_format, to_example
from kubetune_trainer.hardware import Hardware, PrecisionChoice
from kubetune_trainer.reporting import JobRef

from .conftest import TrainerRun, build_tokenizer, to_jsonl, upload_folder

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
FP32 = PrecisionChoice("fp32", "test")
CPU_PLAN = sft.Plan(
    FP32,
    cuda=False,
    gradient_checkpointing=False,
    assistant_only_loss=False,
    speed=throughput.plan(
        TrainingSpec(), "lora", CPU, FP32, throughput.Installed(flash_attn=False, liger_kernel=False)
    ),
)
FIELDS = FieldMapping()
#: The toy task: is the color warm? The text ends with the color, the token the head reads.
WARM = ("red", "orange", "yellow", "purple")


COOL = tuple(c for c in COLORS if c not in WARM)


def preference_pairs(n: int) -> list[dict[str, Any]]:
    """Pairs whose chosen answer is a warm color and rejected one a cool color (a reward model has
    to read the answer; which prompt it follows does not matter)."""
    return [
        {
            "prompt": f"after {COLORS[i % 8]} comes",
            "chosen": f" {WARM[i % 4]}",
            "rejected": f" {COOL[i // 4 % 4]}",
        }
        for i in range(n)
    ]


def color_records(n: int) -> list[dict[str, Any]]:
    return [
        {"text": f"what follows {c}", "label": "warm" if c in WARM else "cool"}
        for c in (COLORS[i % len(COLORS)] for i in range(n))
    ]


# -- the label set ---------------------------------------------------------------------------------
def test_labels_are_discovered_sorted_or_as_their_own_indices() -> None:
    found, problem = labels.discover(["pos", "neg", "pos", "mixed"], "train.jsonl")
    assert problem is None
    assert found is not None
    assert found.names == ("mixed", "neg", "pos")
    assert [found.index(x) for x in ("neg", "pos", 0)] == [1, 2, 0]
    indexed, _ = labels.discover([2, 0, 1, 1], "train.jsonl")
    assert indexed is not None
    assert indexed.names == ("0", "1", "2")
    assert indexed.problem(3, "label") == (
        "field 'label' is the index 3, but the training data has 3 labels (indices 0 to 2: '0', '1', '2')"
    )
    assert indexed.problem("1", "label") is None  # integer labels are their own names


def test_unusable_label_sets_name_the_file() -> None:
    assert labels.discover([0, 2, 2], "train.jsonl") == (
        None,
        "train.jsonl: the labels are indices up to 2, but 1 never appear: without classification.labels"
        " integer labels name the classes 0 to 2, each of which needs records; add them, or list the"
        " class names in classification.labels",
    )
    _, problem = labels.discover(["pos", "pos"], "train.jsonl")
    assert problem is not None
    assert problem.startswith("train.jsonl: every record has the label 'pos': a classifier needs at least 2")


def test_given_labels_are_names_and_indices_into_the_list() -> None:
    given = labels.given(["neg", "pos"])
    assert (given.index("pos"), given.index(0)) == (1, 0)
    assert given.problem("maybe", "y") == (
        "field 'y' is 'maybe', which is not one of the labels of classification.labels ('neg', 'pos')"
    )
    assert given.problem(2, "y") is not None
    assert "has 2 labels (indices 0 to 1" in (given.problem(2, "y") or "")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "field 'label' must be a class name (a string) or an index (an integer), got a boolean"),
        (1.5, "got the number 1.5"),
        (None, "got null"),
        (["a"], "got a list"),
        ("  ", "field 'label' is empty"),
        (-1, "field 'label' is the index -1: indices start at 0"),
    ],
)
def test_label_types(value: Any, problem: str) -> None:
    found = labels.label_problem(value, "label")
    assert found is not None
    assert problem in found
    assert labels.label_problem("pos", "label") is None
    assert labels.label_problem(0, "label") is None


def test_labels_of_one_kind_without_a_list() -> None:
    same = labels.SameKind("label")
    assert same("pos", "train.jsonl line 1") is None
    assert same("neg", "train.jsonl line 2") is None
    problem = same(1, "train.jsonl line 3")
    assert problem is not None
    assert problem.startswith("field 'label' is an index (an integer), but train.jsonl line 1 has a name")


# -- the format ------------------------------------------------------------------------------------
def test_text_with_a_label_is_classification_only_for_a_classifier() -> None:
    record = {"text": "what follows red", "label": "warm"}
    assert detect_format(record, FIELDS) == "text"  # objective sft: a text record with an extra column
    assert detect_format(record, FIELDS, ("classification",)) == "classification"
    assert detect_format({"text": "x"}, FIELDS, ("classification",)) == "text"
    mapped = FieldMapping(text="sentence", text_pair="context", label="category")
    pair = {"sentence": "s", "context": "c", "category": 1}
    assert detect_format(pair, mapped, ("classification",)) == "classification"
    assert check_record("classification", pair, mapped) == []
    assert to_example("classification", pair, mapped) == {"text": "s", "text_pair": "c", "label": 1}
    assert check_record("classification", {"text": "x", "text_pair": ""}, FIELDS) == [
        "field 'text_pair' is empty",
        "missing 'label'",
    ]


def _validate(
    tmp_path: Path, train: list[dict[str, Any]], val: list[dict[str, Any]] | None, **kw: Any
) -> Any:
    (tmp_path / "train.jsonl").write_bytes(to_jsonl(train))
    files = dataset.DataFiles(tmp_path / "train.jsonl", None)
    spec = DatasetSpec.model_validate({"train": "s3://b-1/train.jsonl"})
    if val is not None:
        (tmp_path / "val.jsonl").write_bytes(to_jsonl(val))
        files = dataset.DataFiles(files.train, tmp_path / "val.jsonl")
        spec = DatasetSpec.model_validate(
            {"train": "s3://b-1/train.jsonl", "validation": "s3://b-1/val.jsonl"}
        )
    return dataset.validate(spec, files, "sft", "sequence-classification", **kw)


def test_validated_classification_data_carries_the_label_names(tmp_path: Path) -> None:
    data = _validate(tmp_path, color_records(8), color_records(2))
    assert (data.format, data.labels) == ("classification", ("cool", "warm"))
    assert data.train[0] == {"text": "what follows red", "text_pair": None, "label": 1}
    assert [r["label"] for r in data.validation] == [1, 0]
    given = _validate(
        tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}], None, class_names=["neg", "pos"]
    )
    assert [r["label"] for r in given.train] == [1, 0]
    assert given.labels == ("neg", "pos")


def test_rows_tokenize_their_pair_and_truncate(tmp_path: Path) -> None:
    """A pair after a record without one keeps it (the rows all have the key); maxSeqLength cuts."""
    from datasets import Dataset

    tokenizer = build_tokenizer()
    data = _validate(
        tmp_path,
        [{"text": "what follows red", "label": "warm"}, {**color_records(2)[1], "text_pair": "red"}],
        None,
    )
    rows = classification.tokenized(Dataset.from_list(data.train), tokenizer, max_length=3)
    assert rows.column_names == ["label", "input_ids", "attention_mask"]
    single, paired = rows["input_ids"]
    assert single == tokenizer("what follows red")["input_ids"]
    assert len(tokenizer("what follows green", "red")["input_ids"]) == 4
    # truncated to 3, from the longer text: the pair's own token stays
    assert paired == tokenizer("what follows", "red")["input_ids"]


def test_unusable_classification_data_fails_before_any_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataError) as one_class:
        _validate(tmp_path, [{"text": "a", "label": "pos"}] * 3, None)
    assert "train.jsonl: every record has the label 'pos'" in str(one_class.value)
    with pytest.raises(InvalidDataError) as unseen:
        _validate(tmp_path, color_records(8), [{"text": "x", "label": "hot"}])
    assert (
        "val.jsonl line 1: field 'label' is 'hot', which is not one of the labels of the training data"
        in str(unseen.value)
    )
    with pytest.raises(InvalidDataError) as no_labels:
        _validate(tmp_path, [{"text": "a"}], None)
    assert str(no_labels.value).endswith(
        "train.jsonl line 1: a text record (field 'text'), but task sequence-classification trains on"
        " labelled text (fields 'text' and 'label'): add a 'label' to every record (or name its column in"
        " dataset.fieldMapping.label), or use task causal-lm"
    )


# -- the metrics -----------------------------------------------------------------------------------
def test_classification_report_is_scikit_learns() -> None:
    import numpy as np

    # truth: a a b b c; predicted: a b b b a (class c never predicted)
    logits = np.eye(3)[[0, 1, 1, 1, 0]]
    report = classification.classification_report(logits, np.array([0, 0, 1, 1, 2]), ("a", "b", "c"))
    assert report["accuracy"] == pytest.approx(3 / 5)
    # per class precision a 1/2, b 2/3, c 0; recall a 1/2, b 1, c 0
    assert report["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert report["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert report["f1"] == pytest.approx((1 / 2 + 0.8 + 0) / 3)
    assert report["confusionMatrix"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]],
    }
    assert report["perClass"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_evaluation_progress_carries_accuracy_and_f1() -> None:
    progress = reporting.evaluation_progress(
        6, {"eval_loss": 0.5, "eval_accuracy": 0.875, "eval_f1": 0.86666}
    )
    assert progress == {"step": 6, "evalLoss": 0.5, "evalAccuracy": 0.875, "evalF1": 0.8667}
    # A reward model's accuracy is logged under DPO's name: reward accuracy, not a classifier's.
    renamed = reward.renamed({"accuracy": 0.5, "margin": 1.0, "loss": 2.0})
    assert renamed == {"rewards/accuracies": 0.5, "rewards/margins": 1.0, "loss": 2.0}
    evaluated = reward.renamed({"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_margin": 0.2})
    assert reporting.evaluation_progress(8, evaluated) == {
        "step": 8,
        "evalLoss": 0.5,
        "evalRewardAccuracy": 0.75,
    }


# -- the declared maps -----------------------------------------------------------------------------
def _accounted(passed: set[str], elsewhere: set[str]) -> None:
    fields = set(TrainingSpec.model_fields)
    translated = set(sft.TRANSLATED)
    assert not passed & translated
    assert fields == passed | translated | elsewhere, (
        f"unaccounted: {fields - passed - translated - elsewhere}"
    )


def test_every_training_field_reaches_the_arguments_or_is_declared(tmp_path: Path) -> None:
    from transformers import TrainingArguments
    from trl.trainer.reward_config import RewardConfig

    _accounted(
        set(classification.same_named(TrainingSpec(), TrainingArguments)),
        set(sft.READ_AT_LOAD | classification.NOT_APPLICABLE.keys() | classification.READ_AT_TOKENIZATION),
    )
    spec = TrainingSpec.model_validate(
        {"maxSeqLength": 48, "learningRate": 0.001, "maxSteps": 9, "evalSteps": 3}
    )
    args = classification.arguments(spec, CPU_PLAN, tmp_path)
    assert (args.learning_rate, args.max_steps, args.eval_steps) == (0.001, 9, 3)
    assert (args.use_cpu, args.bf16, args.activation_checkpointing, args.report_to) == (
        True,
        False,
        False,
        [],
    )
    reward_args = reward.reward_config(spec, CPU_PLAN, tmp_path)
    assert isinstance(reward_args, RewardConfig)
    assert (reward_args.max_length, reward_args.learning_rate, reward_args.bf16) == (48, 0.001, False)
    assert reward_args.activation_checkpointing is False  # not TRL's default (on)


# -- runs through the entrypoint -------------------------------------------------------------------
def _get(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def _download(s3_client: Any, bucket: str, dest: Path) -> Path:
    """The published output, as ``kubetune download`` would fetch it (checkpoints left out)."""
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/job-1/")["Contents"]
    for obj in listed:
        name = obj["Key"].removeprefix("out/job-1/")
        if not name.startswith("checkpoints/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(_get(s3_client, bucket, obj["Key"]))
    return dest


def _loaded_by_the_card(
    s3_client: Any, run: TrainerRun, base: Path, folder: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, Any]]:
    """The model card, and what its first snippet defines (``model``, ``tokenizer``) when run as a
    user runs it: in a folder holding the output where its download lines put it (``folder``: the
    job's name, else the output prefix's last part) and the s3:// base model in ./base-model."""
    card = _get(s3_client, run.bucket, "out/job-1/README.md").decode()
    out = _download(s3_client, run.bucket, run.work / folder)
    assert (out / "adapter_model.safetensors").exists()
    shutil.copytree(base, run.work / "base-model")
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(run.work)
    loaded: dict[str, Any] = {}
    exec(snippet, loaded)  # noqa: S102 - the card's code, as a user runs it
    return card, loaded


def _predictions(model: Any, tokenizer: Any, rows: Sequence[tuple[str, str | None]]) -> list[int]:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for text, pair in rows:
            out.append(int(model(**tokenizer(text, pair, return_tensors="pt")).logits[0].argmax()))
    return out


def _confusion(truth: list[int], predicted: list[int], n: int) -> list[list[int]]:
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def _check_classification_metrics(metrics: dict[str, Any], names: list[str]) -> None:
    assert (metrics["task"], metrics["objective"], metrics["datasetFormat"]) == (
        "sequence-classification",
        "sft",
        "classification",
    )
    assert metrics["labels"] == names
    for name in ("evalAccuracy", "evalPrecision", "evalRecall", "evalF1"):
        assert 0.9 <= metrics[name] <= 1.0, (name, metrics)  # an easy task, learnt well above chance
    matrix = metrics["confusionMatrix"]
    assert matrix["labels"] == names
    assert sum(map(sum, matrix["matrix"])) == 16
    assert set(metrics["perClass"]) == set(names)
    assert [e["step"] for e in metrics["evalHistory"]][-1] == metrics["globalStep"]
    losses = [e["loss"] for e in metrics["lossHistory"]]
    assert losses[-1] < losses[0]


@pytest.mark.s3
@pytest.mark.slow
def test_lora_classifier_trains_reports_and_loads_back(
    trainer_run: TrainerRun,
    s3_client: Any,
    tiny_model_dir: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """String labels discovered from the data; a LoRA adapter whose saved head, loaded by the model
    card's snippet, reproduces the evaluation's predictions; accuracy and F1 live in status.progress."""
    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    validation = color_records(16)
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(color_records(32)))
    s3_client.put_object(Bucket=bucket, Key="data/val.jsonl", Body=to_jsonl(validation))
    run.config.update(task="sequence-classification", method="lora")
    run.config["dataset"]["validation"] = f"s3://{bucket}/data/val.jsonl"
    # fp32 (not the CPU's bf16): the reloaded adapter is compared with the evaluation's predictions.
    run.config["training"].update(
        maxSteps=24, learningRate=0.005, evalStrategy="steps", evalSteps=12, maxSeqLength=16, precision="fp32"
    )
    finetunejob: JobRef = request.getfixturevalue("finetunejob")  # live progress on the real apiserver
    kube_api = request.getfixturevalue("kube_api")
    run.env["KUBECONFIG"] = str(request.getfixturevalue("local_env").kubeconfig)
    run.config["reporting"].update(
        name=finetunejob.name, namespace=finetunejob.namespace, intervalSeconds=0.5
    )

    code, log = run.run()
    assert code == 0, log
    assert "dataset: format classification (detected), 32 train / 16 validation records" in log
    assert "dataset: 2 labels (the training data)" in log
    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    _check_classification_metrics(metrics, ["cool", "warm"])
    summary = json.loads(run.termination_path.read_text())
    assert (summary["evalAccuracy"], summary["evalF1"]) == (metrics["evalAccuracy"], metrics["evalF1"])

    from kubernetes import client

    obj: Any = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, finetunejob.namespace, PLURAL, finetunejob.name
    )
    progress = obj["status"]["progress"]
    assert progress["evalAccuracy"] == round(metrics["evalAccuracy"], 4)
    assert progress["evalF1"] == round(metrics["evalF1"], 4)

    card, loaded = _loaded_by_the_card(s3_client, run, tiny_model_dir, finetunejob.name, monkeypatch)
    assert "- Task: sequence-classification, 2 labels: cool, warm" in card
    assert f"- Validation (macro averages): accuracy {metrics['evalAccuracy']:.4f}" in card
    assert 'id2label={0: "cool", 1: "warm"}' in card
    predicted = _predictions(loaded["model"], loaded["tokenizer"], [(r["text"], None) for r in validation])
    truth = [1 if r["label"] == "warm" else 0 for r in validation]
    assert _confusion(truth, predicted, 2) == metrics["confusionMatrix"]["matrix"]


@pytest.mark.s3
@pytest.mark.slow
def test_full_classifier_of_text_pairs_with_given_labels_loads_on_its_own(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    """Integer labels indexing classification.labels, renamed columns, text pairs, padded batches,
    every weight trained: the output is a complete classifier with the label names in its config."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def pairs(n: int) -> list[dict[str, Any]]:
        return [
            {"sentence": "name the color after", "context": c, "category": int(c in WARM)}
            for c in (COLORS[i % len(COLORS)] for i in range(n))
        ]

    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    validation = pairs(16)
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(pairs(32)))
    s3_client.put_object(Bucket=bucket, Key="data/val.jsonl", Body=to_jsonl(validation))
    run.config.update(
        task="sequence-classification", method="full", classification={"labels": ["cool", "warm"]}
    )
    run.config["dataset"].update(
        validation=f"s3://{bucket}/data/val.jsonl",
        fieldMapping={"text": "sentence", "textPair": "context", "label": "category"},
    )
    run.config["training"].update(
        maxSteps=24, learningRate=0.002, batching="padded", maxSeqLength=16, saveSteps=12, precision="fp32"
    )

    code, log = run.run()
    assert code == 0, log
    assert "dataset: 2 labels (classification.labels)" in log
    assert "batching: padded (requested padded)" in log
    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    _check_classification_metrics(metrics, ["cool", "warm"])

    out = _download(s3_client, bucket, run.work / "output")
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "cool", 1: "warm"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    predicted = _predictions(model, tokenizer, [(r["sentence"], r["context"]) for r in validation])
    truth = [r["category"] for r in validation]
    assert _confusion(truth, predicted, 2) == metrics["confusionMatrix"]["matrix"]


def _margins(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> list[float]:
    """Reward of prompt + chosen minus that of prompt + rejected, as TRL scores them (EOS appended)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for r in records:
            scores = [
                float(
                    model(**tokenizer(r["prompt"] + r[k] + tokenizer.eos_token, return_tensors="pt")).logits[
                        0, 0
                    ]
                )
                for k in ("chosen", "rejected")
            ]
            out.append(scores[0] - scores[1])
    return out


@pytest.mark.s3
@pytest.mark.slow
def test_lora_reward_model_ranks_chosen_above_rejected(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """objective reward: a one-score head with a LoRA adapter on the causal LM base; its reward
    accuracy in metrics.json, and the published adapter (loaded by the model card's snippet) ranks
    the pairs better than the base with a fresh head does."""
    import torch
    from transformers import AutoModelForSequenceClassification

    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    records = preference_pairs(32)
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(records))
    run.config.update(objective="reward", method="lora")
    run.config["dataset"]["validationSplit"] = 0.25
    run.config["training"].update(maxSteps=16, evalStrategy="steps", evalSteps=8, maxSeqLength=32)

    code, log = run.run()
    assert code == 0, log
    assert "dataset: format preference (detected)" in log
    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    assert metrics["objective"] == "reward"
    for name in ("rewardAccuracy", "rewardMargin", "evalRewardAccuracy", "evalRewardMargin"):
        assert isinstance(metrics[name], float), (name, metrics)
    assert metrics["evalRewardAccuracy"] >= 0.75, metrics
    history = metrics["rewardHistory"]
    assert history[-1]["step"] == 16
    assert "rewards/accuracies" in history[-1]

    card, loaded = _loaded_by_the_card(s3_client, run, tiny_model_dir, "job-1", monkeypatch)
    assert "- Objective: reward (a reward model" in card
    assert f"{metrics['evalRewardAccuracy']} (validation)" in card
    tokenizer = loaded["tokenizer"]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
    )
    before = _margins(base, tokenizer, records[:8])
    after = _margins(loaded["model"], tokenizer, records[:8])
    assert sum(m > 0 for m in after) >= 6, after
    assert sum(after) / 8 > sum(before) / 8 + 0.1, (before, after)


def test_reward_refuses_data_the_length_filter_empties_training_or_validation() -> None:
    reward._check_kept("validation", 3, 4, 64)  # some left: a warning only
    for which in ("training", "validation"):
        with pytest.raises(
            InvalidDataError, match=f"every {which} pair is longer than training.maxSeqLength 64"
        ):
            reward._check_kept(which, 0, 4, 64)
