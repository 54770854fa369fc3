"""objective dpo: the DPOConfig from the declared map, the base model as the reference, and a real
run through the entrypoint (tiny Llama, data and output in the local S3 server) whose adapter
prefers the chosen responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_api.spec import DpoSpec, TrainingSpec
from kubetune_api.trainer import TrainerConfig
from kubetune_localenv.tinymodel import COLORS
from kubetune_trainer import dpo, kto, modeling, sft, throughput
from kubetune_trainer.hardware import Hardware, PrecisionChoice
from kubetune_trainer.reporting import JobRef

from .conftest import TrainerRun, to_jsonl, upload_folder

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
FP32 = PrecisionChoice("fp32", "test")
NOTHING_INSTALLED = throughput.Installed(flash_attn=False, liger_kernel=False)
CPU_PLAN = sft.Plan(
    FP32,
    cuda=False,
    gradient_checkpointing=False,
    assistant_only_loss=False,
    speed=throughput.plan(TrainingSpec(), "qlora", CPU, FP32, NOTHING_INSTALLED),
)


def preference_records(n: int, *, chat: bool = False) -> list[dict[str, Any]]:
    """Pairs over the tiny tokenizer's words: the chosen response names the next color, the
    rejected one the color before."""
    records: list[dict[str, Any]] = []
    for i in range(n):
        color, after, before = COLORS[i % 8], COLORS[(i + 1) % 8], COLORS[(i - 1) % 8]
        if chat:
            records.append(
                {
                    "prompt": [{"role": "user", "content": f"what follows {color}"}],
                    "chosen": [{"role": "assistant", "content": after}],
                    "rejected": [{"role": "assistant", "content": before}],
                }
            )
        else:
            records.append(
                {"prompt": f"after {color} comes", "chosen": f" {after}", "rejected": f" {before}"}
            )
    return records


# -- the declared map ------------------------------------------------------------------------------
def test_every_training_field_reaches_dpo_config_or_is_declared() -> None:
    fields = set(TrainingSpec.model_fields)
    passed = set(dpo.same_named(TrainingSpec()))
    translated = set(sft.TRANSLATED)
    elsewhere = sft.READ_AT_LOAD | dpo.NOT_APPLICABLE.keys()
    assert not passed & (translated | elsewhere)
    assert fields == passed | translated | elsewhere, (
        f"reach neither DPOConfig nor a translation: {fields - passed - translated - elsewhere}"
    )
    assert set(DpoSpec.model_fields) == set(dpo.DPO_SECTION)
    assert set(dpo.DPO_SECTION.values()) <= sft.config_fields(dpo.config_class())


def test_dpo_config_carries_the_spec_the_section_and_the_plan(tmp_path: Path) -> None:
    spec = TrainingSpec.model_validate({"maxSeqLength": 128, "learningRate": 0.001, "maxSteps": 9})
    args = dpo.dpo_config(spec, DpoSpec(beta=0.3, loss_type="ipo"), CPU_PLAN, tmp_path)
    assert (args.max_length, args.learning_rate, args.max_steps) == (128, 0.001, 9)
    assert (args.beta, args.loss_type) == (0.3, ["ipo"])
    assert args.padding_free is False
    # TRL's DPOConfig defaults (bf16, gradient checkpointing on, lr 1e-6) do not leak through.
    assert (args.bf16, args.fp16, args.use_cpu, args.activation_checkpointing) == (False, False, True, False)
    assert args.report_to == []
    defaults = dpo.dpo_config(TrainingSpec(), None, CPU_PLAN, tmp_path)
    assert (defaults.beta, defaults.loss_type, defaults.learning_rate) == (0.1, ["sigmoid"], 2e-4)


# -- the reference model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_the_reference_is_the_base_model_with_the_adapter_disabled(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """ref_model=None with a peft config: no second copy of the weights, and the reference pass
    (adapter disabled) computes what the untouched base model does, after the adapter moved."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_params = sum(p.numel() for p in model.parameters())
    training = TrainingSpec.model_validate(
        {"maxSteps": 3, "learningRate": 0.05, "perDeviceTrainBatchSize": 4}
    )
    trainer = dpo.build_trainer(
        model,
        tokenizer=tokenizer,
        args=dpo.dpo_config(training, None, CPU_PLAN, tmp_path),
        datasets=(Dataset.from_list(preference_records(8)), None),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[],
        speed=CPU_PLAN.speed,
    )
    assert trainer.ref_model is None
    assert isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" adapter copy either
    lora_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in trainer.model.parameters()) == base_params + lora_params
    trainer.train()

    fresh: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fresh.eval()
    input_ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    trained = trainer.model.eval()
    with torch.no_grad():
        with trained.disable_adapter():
            reference = trained(input_ids=input_ids).logits
        policy = trained(input_ids=input_ids).logits
        base = fresh(input_ids=input_ids).logits
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-4)


def _job(method: str, objective: str = "dpo", **extra: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"source": "org/base", "revision": "v2", "trustRemoteCode": True},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run"},
            "objective": objective,
            "method": method,
            "training": {"perDeviceTrainBatchSize": 2},
            **extra,
        }
    )


def test_without_an_adapter_trl_loads_the_reference_at_the_policys_revision(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """full and freeze: DPOTrainer loads a frozen reference copy by the policy's name, with
    DPOConfig's model_init_kwargs; the base's revision and trust_remote_code reach it (TRL's
    defaults: the hub's default branch, no remote code). With an adapter nothing is loaded."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer import dpo_trainer

    loaded: list[tuple[str, dict[str, Any]]] = []

    def load(model_id: str, **kwargs: Any) -> Any:
        loaded.append((model_id, kwargs))
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    monkeypatch.setattr(dpo_trainer, "create_model_from_path", load)
    caplog.set_level("INFO", logger="kubetune_trainer")
    cfg = _job("full")
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config._name_or_path = "org/base"  # as from_pretrained("org/base") sets it
    trainer = dpo.build_trainer(
        model,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        args=dpo.dpo_config(cfg.training, None, CPU_PLAN, tmp_path, modeling.reference_init_kwargs(cfg)),
        datasets=(Dataset.from_list(preference_records(4)), None),
        peft_config=None,
        callbacks=[],
        speed=CPU_PLAN.speed,
    )
    ((model_id, kwargs),) = loaded
    assert model_id == "org/base"
    assert (kwargs["revision"], kwargs["trust_remote_code"]) == ("v2", True)
    assert trainer.ref_model is not None
    assert "dpo reference: a frozen copy of the base, loaded by TRL with {'revision': 'v2'" in caplog.text
    freeze = _job("freeze", "kto", freeze={"trainableLayers": 1})
    args = kto.kto_config(freeze.training, None, CPU_PLAN, tmp_path, modeling.reference_init_kwargs(freeze))
    assert args.model_init_kwargs == {"revision": "v2", "trust_remote_code": True}
    lora = _job("lora")
    assert modeling.reference_init_kwargs(lora) == {}
    assert dpo.dpo_config(lora.training, None, CPU_PLAN, tmp_path, {}).model_init_kwargs is None


# -- a run through the entrypoint ------------------------------------------------------------------
def _get(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def published_margins(
    s3_client: Any, bucket: str, model_dir: Path, tmp_path: Path, pairs: list[tuple[str, str, str]]
) -> tuple[list[float], list[float]]:
    """The published adapter (loaded on the base with peft): for each (prompt, better, worse) text
    pair, the better response's log-probability minus the worse one's (one word each), under the
    base model and under the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (adapter_dir / name).write_bytes(_get(s3_client, bucket, f"out/job-1/{name}"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.eval()

    def margins(model: Any) -> list[float]:
        out = []
        for prompt, *responses in pairs:
            scores = []
            for response in responses:
                ids = tokenizer(prompt + response, return_tensors="pt").input_ids
                with torch.no_grad():
                    logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                scores.append(float(logps[-1, ids[0, -1]]))  # the response's one word
            out.append(scores[0] - scores[1])
        return out

    before = margins(base)
    return before, margins(PeftModel.from_pretrained(base, str(adapter_dir)).eval())


def _adapter_prefers_chosen(
    s3_client: Any, bucket: str, model_dir: Path, tmp_path: Path, *, text: bool
) -> None:
    """The published adapter loads on the base with peft, changes its outputs, and (trained on
    the text pairs scored here) gives the chosen responses a larger margin than the base does."""
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in preference_records(8)]
    before, after = published_margins(s3_client, bucket, model_dir, tmp_path, pairs)
    assert after != before
    if text:
        assert sum(after) / len(after) > sum(before) / len(before) + 0.1, (before, after)


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_dpo_trains_and_publishes_reward_metrics(
    chat: bool, trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    upload_folder(s3_client, tiny_model_dir, bucket, "models/tiny")
    s3_client.put_object(
        Bucket=bucket, Key="data/train.jsonl", Body=to_jsonl(preference_records(32, chat=chat))
    )
    run.config["objective"] = "dpo"
    run.config["dpo"] = {"beta": 0.5}
    run.config["dataset"]["validationSplit"] = 0.25  # format auto: detected as preference
    run.config["training"].update(evalStrategy="steps", evalSteps=6)
    job: JobRef | None = None
    if chat:  # live progress to a real FineTuneJob on the real apiserver
        job = request.getfixturevalue("finetunejob")
        run.env["KUBECONFIG"] = str(request.getfixturevalue("local_env").kubeconfig)
        run.config["reporting"].update(name=job.name, namespace=job.namespace, intervalSeconds=0.5)

    code, log = run.run()
    assert code == 0, log
    assert "dataset: format preference (detected), 32 train / 0 validation records" in log
    assert "batching: length-grouped" in log

    metrics = json.loads(_get(s3_client, bucket, "out/job-1/metrics.json"))
    assert metrics["objective"] == "dpo"
    assert metrics["datasetFormat"] == "preference"
    assert metrics["globalStep"] == 12
    for name in ("rewardAccuracy", "rewardMargin", "rewardChosen", "rewardRejected", "evalRewardAccuracy"):
        assert isinstance(metrics[name], float), name
    history = metrics["rewardHistory"]
    assert [e["step"] for e in history] == list(range(1, 13))
    assert set(history[0]) == {
        "step",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
    }
    assert metrics["rewardMargin"] == history[-1]["rewards/margins"]
    if not chat:
        # Learning to prefer: the margin grows and the held-out pairs are ranked right. (The chat
        # pairs, behind the template's role tokens, are too hard for 12 steps of this 2-layer
        # random model: that run checks the conversational path and the live status.)
        first, last = history[0]["rewards/margins"], history[-1]["rewards/margins"]
        assert last > first + 0.1, history
        assert metrics["evalRewardAccuracy"] >= 0.75, metrics
    assert isinstance(metrics["evalLoss"], float)

    summary = json.loads(run.termination_path.read_text())
    assert (summary["objective"], summary["rewardAccuracy"]) == ("dpo", metrics["rewardAccuracy"])
    card = _get(s3_client, bucket, "out/job-1/README.md").decode()
    assert "tags: [kubetune, lora, dpo, trl]" in card
    assert "- Objective: dpo (loss sigmoid, beta 0.5; reference: the base model)" in card
    stored = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/job-1/checkpoints/step-12/")
    assert stored.get("KeyCount", 0) > 0
    if job is not None:
        from kubernetes import client

        obj: Any = client.CustomObjectsApi(request.getfixturevalue("kube_api")).get_namespaced_custom_object(
            GROUP, VERSION, job.namespace, PLURAL, job.name
        )
        progress = obj["status"]["progress"]
        assert progress["step"] == 12
        assert 0.0 <= progress["rewardAccuracy"] <= 1.0
        assert progress["rewardMargin"] == round(metrics["rewardMargin"], 4)
        assert {"rewardChosen", "rewardRejected", "evalRewardAccuracy"} <= set(progress)
    _adapter_prefers_chosen(s3_client, bucket, tiny_model_dir, run.work, text=not chat)
