"""The result's loss plot and model card (``results.py``, ``lossplot.py``), without training.

The card's code is read back the way a user reads it: its fenced blocks. The snippet is run for
real against a trained output in ``test_training.py`` (:func:`follow_card` is shared with it).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import wellknown
from kubetune_api.trainer import TrainerConfig
from kubetune_trainer import lossplot, results
from kubetune_trainer.storage import ObjectStore

from .conftest import build_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN = [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 13)]
EVALS = [{"step": 6, "loss": 2.4}, {"step": 12, "loss": 1.9}]


def card_blocks(card: str, lang: str) -> list[str]:
    """The card's fenced code blocks in ``lang``."""
    return [body for found, body in re.findall(r"```(\w+)\n(.*?)```", card, re.DOTALL) if found == lang]


def card_syncs(card: str) -> list[tuple[str, str, list[str]]]:
    """``(s3 uri, local folder, excluded patterns)`` for each ``aws s3 sync`` line of the card."""
    syncs = []
    for block in card_blocks(card, "shell"):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:3] == ["aws", "s3", "sync"]:
                excludes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--exclude"]
                syncs.append((argv[3], argv[4], excludes))
    return syncs


def follow_card(card: str, s3_client: Any, cwd: Path) -> list[dict[str, Any]]:
    """Do what the card says in ``cwd``: each ``aws s3 sync`` (with boto3, honouring its
    ``--exclude``), then each Python block; returns each block's variables."""
    for uri, folder, excludes in card_syncs(card):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in (o for page in pages for o in page.get("Contents", [])):
            rel = obj["Key"].removeprefix(prefix)
            if any(fnmatch.fnmatch(rel, pattern) for pattern in excludes):
                continue
            dest = cwd / folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3_client.download_file(bucket, obj["Key"], str(dest))
    ran = []
    for code in card_blocks(card, "python"):
        scope: dict[str, Any] = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- the card's own code, as a user runs it
        ran.append(scope)
    return ran


def _config(**overrides: Any) -> TrainerConfig:
    raw: dict[str, Any] = {
        "model": {"source": "s3://models-bkt/tiny"},
        "dataset": {"train": "s3://data-bkt/train.jsonl"},
        "output": {"uri": "s3://out-bkt/runs/job-1"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainerConfig.model_validate(raw)


def _loaded_paths(code: str) -> list[str]:
    """The first argument of every ``from_pretrained`` call in a Python block."""
    return re.findall(r"from_pretrained\((?:base, )?\"([^\"]+)\"", code)


# -- metrics ---------------------------------------------------------------------------------------
def test_eval_loss_history_one_point_per_step_in_step_order() -> None:
    history = [
        {"loss": 2.9, "step": 1},
        {"eval_loss": 2.5, "step": 6},
        {"loss": 2.1, "step": 12},
        {"eval_loss": 2.0, "step": 12},
        {"train_runtime": 3.0, "step": 12},
        {"eval_loss": 1.99, "step": 12},  # trainer.evaluate() after training: the same weights
    ]
    assert lossplot.eval_loss_history(history) == [{"step": 6, "loss": 2.5}, {"step": 12, "loss": 1.99}]
    assert lossplot.eval_loss_history([{"loss": 1.0, "step": 1}]) == []


# -- loss.png --------------------------------------------------------------------------------------
def test_plot_is_a_png_and_draws_the_eval_curve(tmp_path: Path) -> None:
    from matplotlib.image import imread

    train_only, both = tmp_path / "a", tmp_path / "b"
    train_only.mkdir()
    both.mkdir()
    assert lossplot.write(train_only, {"lossHistory": TRAIN, "evalLossHistory": []})
    assert lossplot.write(both, {"lossHistory": TRAIN, "evalLossHistory": EVALS})
    a, b = (imread(str(folder / lossplot.LOSS_PLOT)) for folder in (train_only, both))
    assert all((f / lossplot.LOSS_PLOT).read_bytes().startswith(PNG_SIGNATURE) for f in (train_only, both))
    assert a.shape[:2] == (400, 700)
    assert (a != b).any()  # the eval points and their legend entry are drawn


def test_plot_failure_is_logged_and_leaves_no_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / lossplot.LOSS_PLOT).mkdir()  # the disk refuses the file: a real OSError from savefig
    with caplog.at_level(logging.WARNING, logger=lossplot.__name__):
        assert not lossplot.write(tmp_path, {"lossHistory": TRAIN})
    assert "could not draw loss.png (IsADirectoryError" in caplog.text
    assert "publishing without it" in caplog.text


def test_nothing_logged_no_plot_and_no_stale_one(tmp_path: Path) -> None:
    stale = tmp_path / lossplot.LOSS_PLOT
    stale.write_bytes(PNG_SIGNATURE)  # left by an earlier attempt in the same scratch folder
    assert not lossplot.write(tmp_path, {"lossHistory": []})
    assert not stale.exists()


# -- the model card --------------------------------------------------------------------------------
def test_card_downloads_before_loading_and_loads_only_what_it_downloaded() -> None:
    cfg = _config(
        output={"mergeAdapter": True},
        storage={"endpoint": "http://minio.storage:9000"},
        reporting={"name": "support-chat", "namespace": "ml"},
    )
    card = results.model_card(cfg, {"trainLoss": 1.0}, plot=True)
    assert "![loss](loss.png)" in card
    assert "s3://" not in "".join(card_blocks(card, "python"))
    shell = card_blocks(card, "shell")[0]
    assert "kubetune download support-chat ./support-chat -n ml" in shell
    assert card_syncs(card) == [
        ("s3://out-bkt/runs/job-1", "./support-chat", ["checkpoints/*"]),
        ("s3://models-bkt/tiny", "./base-model", []),
    ]
    assert shell.count("--endpoint-url http://minio.storage:9000") == 2
    adapter, merged = card_blocks(card, "python")
    assert _loaded_paths(adapter) == ["./base-model", "./support-chat", "./support-chat"]
    assert _loaded_paths(merged) == ["./support-chat/merged", "./support-chat/merged"]
    assert "base_model:" not in card.split("---")[1]  # the hub's metadata names hub models only


def test_card_for_a_hub_base_names_it_and_its_revision() -> None:
    cfg = _config(model={"source": "Qwen/Qwen2.5-0.5B", "revision": "abc123", "trustRemoteCode": True})
    card = results.model_card(cfg, {"trainLoss": 1.0})
    assert "![loss]" not in card  # no plot was written
    assert "base_model: Qwen/Qwen2.5-0.5B" in card
    assert card_syncs(card) == [("s3://out-bkt/runs/job-1", "./job-1", ["checkpoints/*"])]
    assert "kubetune download" not in card  # no FineTuneJob name known
    (adapter,) = card_blocks(card, "python")
    assert 'from_pretrained("Qwen/Qwen2.5-0.5B", revision="abc123", trust_remote_code=True)' in adapter
    assert 'PeftModel.from_pretrained(base, "./job-1")' in adapter


# -- the written result, published to the real S3 server -------------------------------------------
def _published(store: ObjectStore, folder: Path, uri: str) -> dict[str, Any]:
    cfg = _config(output={"uri": uri})
    metrics = {"trainLoss": 1.9, "lossHistory": TRAIN, "evalLossHistory": EVALS}
    results.write_local(folder, cfg, None, build_tokenizer(), metrics)
    manifest = results.publish(store, folder, uri)
    return {f["path"]: f for f in manifest["files"]}


@pytest.mark.s3
def test_plot_is_published_in_the_manifest_and_embedded(
    s3_env: dict[str, str], s3_client: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    store = ObjectStore.from_spec(_config().storage)
    listed = _published(store, tmp_path / "result", f"s3://{bucket}/out/ok")
    png = s3_client.get_object(Bucket=bucket, Key="out/ok/loss.png")["Body"].read()
    assert png.startswith(PNG_SIGNATURE)
    assert listed["loss.png"]["size"] == len(png)
    card = s3_client.get_object(Bucket=bucket, Key=f"out/ok/{wellknown.MODEL_CARD}")["Body"].read().decode()
    assert "![loss](loss.png)" in card

    failing = tmp_path / "failing"
    (failing / lossplot.LOSS_PLOT).mkdir(parents=True)
    listed = _published(store, failing, f"s3://{bucket}/out/no-plot")
    assert "loss.png" not in listed
    assert wellknown.METRICS in listed
    card = s3_client.get_object(Bucket=bucket, Key=f"out/no-plot/{wellknown.MODEL_CARD}")["Body"].read()
    assert b"![loss]" not in card
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="out/no-plot/manifest.json")["Body"].read())
    assert {f["path"] for f in manifest["files"]} == set(listed)


# -- the card for each method ----------------------------------------------------------------------
def test_card_of_a_complete_model_loads_it_alone_and_downloads_no_base() -> None:
    for method, extra in (("full", {}), ("freeze", {"freeze": {"trainableModules": ["lm_head", "norm"]}})):
        card = results.model_card(_config(method=method, **extra), {"trainLoss": 1.0})
        assert "library_name: transformers" in card
        assert card_syncs(card) == [("s3://out-bkt/runs/job-1", "./job-1", ["checkpoints/*"])]  # no base
        (code,) = card_blocks(card, "python")
        assert "peft" not in code
        assert 'model = AutoModelForCausalLM.from_pretrained("./job-1")' in code
        assert _loaded_paths(code) == ["./job-1", "./job-1"]
    assert "- Method: freeze; trained lm_head, norm, every other weight as in the base" in card


def test_card_of_a_prompt_learning_adapter_loads_it_on_the_base() -> None:
    cfg = _config(method="prompt-tuning", promptTuning={"numVirtualTokens": 8, "initText": "Answer:"})
    card = results.model_card(cfg, {"trainLoss": 1.0})
    assert "library_name: peft" in card
    assert "# Prompt-tuning adapter trained by kubetune" in card
    assert '- Method: prompt-tuning; 8 virtual tokens, initialized from the text "Answer:"' in card
    assert [sync[1] for sync in card_syncs(card)] == ["./job-1", "./base-model"]
    (code,) = card_blocks(card, "python")
    assert sorted(_loaded_paths(code)) == ["./base-model", "./job-1", "./job-1"]
    prefix = results.model_card(_config(method="prefix-tuning"), {"trainLoss": 1.0})
    assert "- Method: prefix-tuning; 20 virtual tokens, without projection" in prefix


def test_card_names_each_preference_objective_its_settings_and_final_rewards() -> None:
    figures = {
        "trainLoss": 1.0,
        "rewardAccuracy": 0.75,
        "rewardMargin": 0.5,
        "rewardChosen": 0.3,
        "rewardRejected": -0.2,
    }
    dpo = results.model_card(_config(objective="dpo"), figures)
    assert "- Objective: dpo (loss sigmoid, beta 0.1; reference: the base model)" in dpo
    orpo = results.model_card(_config(objective="orpo", orpo={"beta": 0.2}), figures)
    assert "- Objective: orpo (beta 0.2; no reference model)" in orpo
    assert "- Final reward accuracy: 0.75, margin: 0.5" in orpo
    kto = results.model_card(
        _config(objective="kto", kto={"desirableWeight": 1.5}),
        figures,
    )
    assert "desirable weight 1.5, undesirable weight 1.0; reference: the base model" in kto
    assert "- Final rewards: desirable 0.3, undesirable -0.2, margin: 0.5" in kto
    assert "- Objective:" not in results.model_card(_config(), figures)


def test_card_shows_the_first_samples_fenced_whatever_they_hold() -> None:
    rows = [{"prompt": f"p{i}", "base": "b", "tuned": "t"} for i in range(5)]
    rows[0]["tuned"] = "```python\nimport os\n```"  # a generation that would close a ``` fence
    card = results.model_card(_config(), {"trainLoss": 1.0}, samples_rows=rows)
    assert "The first 3 of 5 prompts in `samples.jsonl`" in card
    assert "**Prompt 3**" in card
    assert "**Prompt 4**" not in card
    assert "````text\n```python\nimport os\n```\n````" in card
    (code,) = card_blocks(card.split("## Use")[1], "python")
    assert "PeftModel.from_pretrained" in code


def test_merge_of_a_classifier_adapter_is_a_classifier_with_its_labels(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """mergeAdapter with task sequence-classification: the base is reloaded as a classifier over
    metrics.json's labels, so merged/ loads alone and scores as the base with the adapter does."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune_trainer.hardware import PrecisionChoice

    labels = ["bug", "question", "billing"]
    head = {"num_labels": 3, "id2label": dict(enumerate(labels))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    base: Any = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, dtype=torch.float32, **head
    )
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    with torch.no_grad():  # a trained-looking adapter: LoRA's B starts at zero
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    folder = tmp_path / "result"
    adapter.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / wellknown.METRICS).write_text(json.dumps({"labels": labels}))
    cfg = _config(task="sequence-classification", dataset={"format": "classification"}, method="lora")
    results.merge_adapter(str(tiny_model_dir), folder, cfg, PrecisionChoice("fp32", "test"))

    merged: Any = AutoModelForSequenceClassification.from_pretrained(folder / wellknown.MERGED_DIR)
    assert merged.config.id2label == dict(enumerate(labels))
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    fresh: Any = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, dtype=torch.float32, **head
    )
    on_base = PeftModel.from_pretrained(fresh, str(folder)).eval()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(input_ids=ids).logits, on_base(input_ids=ids).logits, atol=1e-5)
