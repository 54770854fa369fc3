"""Methods full, freeze, prompt-tuning and prefix-tuning, and the sample generations.

Pure logic first (freeze's matching and its errors, the peft config per method, the sample
prompts), then one run per method through the real entrypoint (tiny Llama, data and output in the
local S3 server), each following the model card's download and Python code for real and checking
that the output loads back and changes the model's outputs; the samples are checked in the full
run (validation prompts) and the freeze and prefix runs (samplePrompts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.spec import EvaluationSpec, FreezeSpec
from kubetune_api.trainer import TrainerConfig
from kubetune_localenv.tinymodel import (
    alpaca_records,
    chat_records,
    llama_config,
    prompt_completion_records,
)
from kubetune_trainer import modeling, samples
from kubetune_trainer.errors import InvalidConfigError

from .conftest import TrainerRun, build_tokenizer, to_jsonl, upload_folder
from .test_results import follow_card

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.10.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def _config(**sections: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"source": "s3://models-bkt/tiny"},
            "dataset": {"train": "s3://data-bkt/train.jsonl"},
            "output": {"uri": "s3://out-bkt/runs/job-1"},
            **sections,
        }
    )


# -- freeze: the matching --------------------------------------------------------------------------
def test_a_module_matches_whole_dotted_parts() -> None:
    assert modeling.matches_module("model.norm.weight", "norm")
    assert not modeling.matches_module("model.layers.0.input_layernorm.weight", "norm")
    assert modeling.matches_module("model.layers.1.mlp.down_proj.weight", "mlp.down_proj")
    assert modeling.matches_module("model.layers.1.mlp.down_proj.weight", "layers.1")
    assert not modeling.matches_module("model.layers.10.mlp.down_proj.weight", "layers.1")
    assert not modeling.matches_module("model.layers.1.mlp.down_proj.weight", "down_proj.mlp")
    assert modeling.matches_module("lm_head.weight", "lm_head.weight")


def test_trainable_modules_pick_their_parameters_and_a_head_always_trains() -> None:
    spec = FreezeSpec(trainable_modules=("norm", "layers.1"))
    chosen = modeling.trainable_names(NAMES, spec, None)
    assert chosen == {
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    }
    with_head = modeling.trainable_names(
        NAMES, FreezeSpec(trainable_modules=("lm_head",)), None, ["score.weight"]
    )
    assert with_head == {"lm_head.weight", "score.weight"}


def test_a_module_that_matches_nothing_is_a_config_error_naming_it() -> None:
    spec = FreezeSpec(trainable_modules=("norm", "layer.1", "mlp.gate"))
    with pytest.raises(InvalidConfigError) as caught:
        modeling.trainable_names(NAMES, spec, None)
    message = str(caught.value)
    assert message.startswith("freeze.trainableModules layer.1, mlp.gate match(es) no parameter")
    assert "model.embed_tokens, model.layers.0.self_attn.q_proj" in message  # what they are named like
    assert caught.value.exit_code == ExitCode.INVALID_CONFIG


def test_trainable_layers_are_the_last_ones_and_at_most_the_models() -> None:
    stack = modeling.LayerStack("model.layers", 11)
    chosen = modeling.trainable_names(NAMES, FreezeSpec(trainable_layers=2), stack)
    assert chosen == {"model.layers.10.mlp.down_proj.weight"}  # layers 9 and 10; no layer 1 by prefix
    everything = modeling.trainable_names(NAMES, FreezeSpec(trainable_layers=11), stack)
    assert "model.layers.0.input_layernorm.weight" in everything
    assert "model.norm.weight" not in everything
    assert "lm_head.weight" not in everything
    with pytest.raises(InvalidConfigError, match=r"is 12 but the model has 11 layers \(model.layers\)"):
        modeling.trainable_names(NAMES, FreezeSpec(trainable_layers=12), stack)
    with pytest.raises(InvalidConfigError, match=r"name them with freeze\.trainableModules instead"):
        modeling.trainable_names(NAMES, FreezeSpec(trainable_layers=1), None)


def test_freeze_on_real_models_finds_the_layers_and_trains_a_classification_head() -> None:
    """The layer list found on a Llama (causal LM and classifier, built from a config: no weights
    to load), and apply_freeze setting requires_grad; a selection past the model fails with 43."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    config = llama_config(build_tokenizer(), layers=3)
    lm = LlamaForCausalLM(config)
    assert modeling.find_layers(lm) == modeling.LayerStack("model.layers", 3)
    modeling.apply_freeze(lm, _config(method="freeze", freeze={"trainableLayers": 1}))
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trained
    assert all(n.startswith("model.layers.2.") for n in trained)

    config.num_labels = 3
    classifier: Any = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    cfg = _config(
        task="sequence-classification",
        dataset={"train": "s3://data-bkt/train.jsonl", "format": "classification"},
        method="freeze",
        freeze={"trainableModules": ["norm"]},
    )
    assert modeling.head_names(classifier, cfg) == ["score.weight"]
    modeling.apply_freeze(classifier, cfg)
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == {
        "model.norm.weight",
        "score.weight",
    }
    with pytest.raises(InvalidConfigError) as caught:
        modeling.apply_freeze(lm, _config(method="freeze", freeze={"trainableLayers": 4}))
    assert caught.value.exit_code == ExitCode.INVALID_CONFIG


@pytest.mark.parametrize("reentrant", [False, True])
def test_frozen_embeddings_under_gradient_checkpointing_still_train_the_chosen_layer(reentrant: bool) -> None:
    """With the embeddings and layer 0 frozen, nothing entering the checkpointed layer 1 needs a
    gradient; transformers' activation checkpointing (as the Trainer enables it) makes the inputs
    require grad (enable_input_require_grads), so layer 1 still gets its gradients, reentrant or not."""
    import torch
    from transformers import LlamaForCausalLM

    model: Any = LlamaForCausalLM(llama_config(build_tokenizer()))
    modeling.apply_freeze(model, _config(method="freeze", freeze={"trainableLayers": 1}))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_under_fp16_or_fp32_the_trained_weights_are_fp32_and_the_frozen_ones_stay() -> None:
    """adapter_dtype_fix, after the trainer is built: every trainable weight (all of them with
    full, the chosen ones with freeze) becomes fp32, as fp16 mixed precision (AMP) needs; the
    frozen weights keep the loaded dtype; with bf16 nothing changes."""
    import torch
    from transformers import LlamaForCausalLM

    from kubetune_trainer.hardware import PrecisionChoice

    def _fresh(dtype: Any) -> Any:
        model: Any = LlamaForCausalLM(llama_config(build_tokenizer()))
        return model.to(dtype)

    full: Any = _fresh(torch.float16)
    modeling.adapter_dtype_fix(full, PrecisionChoice("fp16", "test"))
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    frozen: Any = _fresh(torch.float16)
    modeling.apply_freeze(frozen, _config(method="freeze", freeze={"trainableLayers": 1}))
    modeling.adapter_dtype_fix(frozen, PrecisionChoice("fp16", "test"))
    dtypes = {n: p.dtype for n, p in frozen.named_parameters()}
    assert {dtypes[n] for n, p in frozen.named_parameters() if p.requires_grad} == {torch.float32}
    assert {dtypes[n] for n, p in frozen.named_parameters() if not p.requires_grad} == {torch.float16}
    bf16: Any = _fresh(torch.bfloat16)
    modeling.adapter_dtype_fix(bf16, PrecisionChoice("bf16", "test"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


# -- the peft config per method --------------------------------------------------------------------
def test_each_method_gets_its_peft_config() -> None:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    lora = modeling.peft_config(_config(method="lora"), "/base")
    assert isinstance(lora, LoraConfig)
    assert lora.task_type == "CAUSAL_LM"
    reward = modeling.peft_config(
        _config(objective="reward", dataset={"train": "s3://d-bkt/p.jsonl", "format": "preference"}), "/base"
    )
    assert isinstance(reward, LoraConfig)
    assert reward.task_type == "SEQ_CLS"
    random = modeling.peft_config(_config(method="prompt-tuning"), "/base")
    assert isinstance(random, PromptTuningConfig)
    assert (random.num_virtual_tokens, random.prompt_tuning_init, random.tokenizer_name_or_path) == (
        20,
        "RANDOM",
        None,
    )
    text = modeling.peft_config(
        _config(
            model={"source": "org/base", "revision": "v2"},
            method="prompt-tuning",
            promptTuning={"numVirtualTokens": 8, "initText": "Answer briefly:"},
        ),
        "org/base",
    )
    assert isinstance(text, PromptTuningConfig)
    assert (text.prompt_tuning_init, text.prompt_tuning_init_text) == ("TEXT", "Answer briefly:")
    assert (text.tokenizer_name_or_path, text.tokenizer_kwargs) == ("org/base", {"revision": "v2"})
    prefix = modeling.peft_config(
        _config(method="prefix-tuning", prefixTuning={"numVirtualTokens": 5, "projection": True}), "/base"
    )
    assert isinstance(prefix, PrefixTuningConfig)
    assert (prefix.num_virtual_tokens, prefix.prefix_projection, prefix.encoder_hidden_size) == (5, True, 512)
    assert modeling.peft_config(_config(method="full"), "/base") is None
    assert modeling.peft_config(_config(method="freeze", freeze={"trainableLayers": 1}), "/base") is None


# -- the sample prompts ----------------------------------------------------------------------------
def test_sample_prompts_are_rendered_as_training_renders_the_data() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = modeling.DEFAULT_CHAT_TEMPLATE
    user = [{"role": "user", "content": "what follows red"}]
    chat = {
        "messages": [
            *user,
            {"role": "assistant", "content": "green"},
            *user,
            {"role": "assistant", "content": "x"},
        ]
    }
    assert samples.render_row(chat, tokenizer) == (
        "<|user|>\nwhat follows red\n<|assistant|>\ngreen</s>\n<|user|>\nwhat follows red\n<|assistant|>\n"
    ).replace("</s>", tokenizer.eos_token)
    alpaca = {"prompt": user, "completion": [{"role": "assistant", "content": "green"}]}
    assert samples.render_row(alpaca, tokenizer) == "<|user|>\nwhat follows red\n<|assistant|>\n"
    assert (
        samples.render_row({"prompt": "after red comes", "completion": " green"}, tokenizer)
        == "after red comes"
    )
    assert samples.render_row({"prompt": "p", "chosen": "a", "rejected": "b"}, tokenizer) == "p"
    assert samples.render_row({"text": "a whole document"}, tokenizer) is None

    rows = [{"text": "no prompt"}, {"prompt": "one"}, {"prompt": "two"}, {"prompt": "three"}]
    assert samples.choose_prompts(EvaluationSpec(num_samples=2), rows, False, tokenizer) == ["one", "two"]
    given = EvaluationSpec(sample_prompts=("what follows red",))
    assert samples.choose_prompts(given, rows, True, tokenizer) == [
        "<|user|>\nwhat follows red\n<|assistant|>\n"
    ]
    assert samples.choose_prompts(given, rows, False, tokenizer) == ["what follows red"]


def test_no_samples_for_classification_reward_fsdp_or_zero() -> None:
    assert samples.why_none(_config()) is None
    classify = _config(
        task="sequence-classification", dataset={"train": "s3://d-bkt/c.jsonl", "format": "classification"}
    )
    assert "classification" in (samples.why_none(classify) or "")
    reward = _config(objective="reward", dataset={"train": "s3://d-bkt/p.jsonl", "format": "preference"})
    assert "reward" in (samples.why_none(reward) or "")
    assert "FSDP" in (samples.why_none(_config(distributed={"strategy": "fsdp"}, gpus=2)) or "")
    assert "numSamples is 0" in (samples.why_none(_config(evaluation={"numSamples": 0})) or "")
    assert samples.why_none(_config(evaluation={"numSamples": 0, "samplePrompts": ["hi"]})) is None


def test_batched_generation_answers_as_one_prompt_at_a_time(tiny_model_dir: Path) -> None:
    """Left-padded batches (prompts of different lengths) give each prompt the answer it gets
    alone, on the base and with a prompt-tuning adapter (virtual tokens before the padding)."""
    from peft import PromptTuningConfig, get_peft_model

    tokenizer = modeling.load_tokenizer(str(tiny_model_dir), _config().model)
    prompts = ("after red comes", "what follows green then blue then", "name")
    for model in (
        _base(tiny_model_dir),
        get_peft_model(
            _base(tiny_model_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        ),
    ):
        batched = samples.generate(model, tokenizer, samples.Pending(prompts, True, 5, batch_size=3))
        alone = [_greedy(model, tokenizer, p, 5, special_tokens=True) for p in prompts]
        assert batched == alone
        assert len(set(batched)) > 1
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")  # put back


# -- runs through the entrypoint -------------------------------------------------------------------
def _get(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def _run(
    run: TrainerRun, s3_client: Any, model_dir: Path, records: list[dict[str, Any]], **config: Any
) -> str:
    """Train ``records`` with the ``config`` sections (6 steps, no checkpoints); returns the log."""
    upload_folder(s3_client, model_dir, run.bucket, "models/tiny")
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(records))
    run.config.pop("lora")
    # fp32: the test's own fp32 models then generate what the trainer generated, token for token.
    run.config["training"].update(maxSteps=6, saveStrategy="no", precision="fp32")
    for key, value in config.items():
        run.config[key] = {**run.config.get(key, {}), **value} if isinstance(value, dict) else value
    code, log = run.run()
    assert code == 0, log
    return log


def _follow_card(s3_client: Any, bucket: str, work: Path) -> tuple[dict[str, Any], Path]:
    """Download and load the output as its model card says; returns the snippet's variables and
    the downloaded folder."""
    card = _get(s3_client, bucket, "out/job-1/README.md").decode()
    user = work / "user"
    user.mkdir()
    (loaded,) = follow_card(card, s3_client, user)
    return loaded, user / "job-1"


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model.float().eval()(input_ids=torch.tensor([ids])).logits


def _base(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, special_tokens: bool) -> str:
    return samples.generate(model, tokenizer, samples.Pending((prompt,), special_tokens, max_new_tokens))[0]


def _samples(s3_client: Any, bucket: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in _get(s3_client, bucket, "out/job-1/samples.jsonl").splitlines()]


IDS = [2, 5, 6, 7, 8, 9]


@pytest.mark.s3
@pytest.mark.slow
def test_full_writes_a_complete_model_with_samples_of_the_validation_prompts(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    run = trainer_run
    s3_client.put_object(Bucket=run.bucket, Key="data/val.jsonl", Body=to_jsonl(alpaca_records(8)[3:6]))
    log = _run(
        run,
        s3_client,
        tiny_model_dir,
        alpaca_records(16),
        method="full",
        dataset={"validation": f"s3://{run.bucket}/data/val.jsonl"},
        evaluation={"numSamples": 2, "maxNewTokens": 4},
    )
    assert "samples: 2 prompts from validation data, answered after training" in log
    assert "samples: the base model answers before training (method full" in log
    loaded, folder = _follow_card(s3_client, run.bucket, run.work)
    assert not (folder / "adapter_config.json").exists()
    assert (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["use_cache"]
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    assert type(model).__name__ == "LlamaForCausalLM"  # transformers alone, no peft
    base = _base(tiny_model_dir)
    assert not _logits(model, IDS).allclose(_logits(base, IDS), atol=1e-3)

    rows = _samples(s3_client, run.bucket)
    prompts = [samples.render_row(r, tokenizer) for r in ({"prompt": [p]} for p in _alpaca_users(3, 5))]
    assert [r["prompt"] for r in rows] == prompts  # the first two validation records, as rendered
    for row in rows:  # the base answered before training, the tuned model after
        assert row["base"] == _greedy(base, tokenizer, row["prompt"], 4, special_tokens=False)
        assert row["tuned"] == _greedy(model, tokenizer, row["prompt"], 4, special_tokens=False)
    card = _get(s3_client, run.bucket, "out/job-1/README.md").decode()
    assert "library_name: transformers" in card
    assert "# Model fine-tuned by kubetune (every weight)" in card
    assert "The first 2 of 2 prompts in `samples.jsonl`" in card
    assert "base-model" not in card  # a complete model needs no base


def _alpaca_users(start: int, stop: int) -> list[dict[str, str]]:
    from kubetune_trainer.formats import alpaca_prompt

    return [
        {"role": "user", "content": alpaca_prompt(r["instruction"], r["input"])}
        for r in alpaca_records(8)[start:stop]
    ]


@pytest.mark.s3
@pytest.mark.slow
def test_freeze_trains_the_last_layer_only_and_answers_the_sample_prompts(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    from safetensors.torch import load_file

    run = trainer_run
    given = ["after red comes", "after blue comes"]
    log = _run(
        run,
        s3_client,
        tiny_model_dir,
        prompt_completion_records(16),
        method="freeze",
        freeze={"trainableLayers": 1},
        evaluation={"samplePrompts": given, "maxNewTokens": 3},
    )
    assert "freeze: training" in log
    loaded, folder = _follow_card(s3_client, run.bucket, run.work)
    assert type(loaded["model"]).__name__ == "LlamaForCausalLM"
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(folder / "model.safetensors")
    assert set(tuned) == set(base)
    changed = {name for name in base if not base[name].equal(tuned[name])}
    # Every weight of layer 1 trained; every other one is the base's, bit for bit.
    assert changed == {name for name in base if name.startswith("model.layers.1.")}

    rows = _samples(s3_client, run.bucket)
    assert [r["prompt"] for r in rows] == given  # plain text: the data's prompts are strings
    base_model = _base(tiny_model_dir)
    assert [r["base"] for r in rows] == [_greedy(base_model, loaded["tokenizer"], p, 3, True) for p in given]
    card = _get(s3_client, run.bucket, "out/job-1/README.md").decode()
    assert "- Method: freeze; trained the last 1 layers" in card


@pytest.mark.s3
@pytest.mark.slow
def test_prompt_tuning_writes_an_adapter_of_trained_virtual_tokens(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    run = trainer_run
    _run(
        run,
        s3_client,
        tiny_model_dir,
        chat_records(16),
        method="prompt-tuning",
        promptTuning={"numVirtualTokens": 4, "initText": "name the color"},
        training={"learningRate": 0.05},
        evaluation={"numSamples": 0},  # (validation-less anyway: no samples either way)
    )
    loaded, folder = _follow_card(s3_client, run.bucket, run.work)
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    assert isinstance(model, PeftModel)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["num_virtual_tokens"]) == ("PROMPT_TUNING", 4)
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "samples.jsonl").exists()
    # The virtual tokens started as the embeddings of the init text and moved in training.
    (prompt,) = load_file(folder / "adapter_model.safetensors").values()
    base = _base(tiny_model_dir)
    init_ids = tokenizer("name the color")["input_ids"]
    start = base.get_input_embeddings().weight[(init_ids * 4)[:4]]  # peft repeats a short text
    assert prompt.shape == start.shape
    assert not prompt.float().allclose(start, atol=1e-4)
    assert not _logits(model, IDS)[:, -len(IDS) :].allclose(_logits(base, IDS), atol=1e-3)


@pytest.mark.s3
@pytest.mark.slow
def test_prefix_tuning_writes_an_adapter_and_samples_with_it_disabled(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    from peft import PeftModel

    run = trainer_run
    given = ["what follows red"]
    _run(
        run,
        s3_client,
        tiny_model_dir,
        alpaca_records(16),
        method="prefix-tuning",
        prefixTuning={"numVirtualTokens": 4, "projection": True},
        training={"learningRate": 0.05},
        evaluation={"samplePrompts": given, "maxNewTokens": 4},
    )
    loaded, folder = _follow_card(s3_client, run.bucket, run.work)
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    assert isinstance(model, PeftModel)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["prefix_projection"]) == ("PREFIX_TUNING", True)
    base = _base(tiny_model_dir)
    assert not _logits(model, IDS).allclose(_logits(base, IDS), atol=1e-3)

    (row,) = _samples(s3_client, run.bucket)
    assert row["prompt"] == "<|user|>\nwhat follows red\n<|assistant|>\n"  # alpaca trains on conversations
    assert row["base"] == _greedy(base, tokenizer, row["prompt"], 4, special_tokens=False)
    assert row["tuned"] == _greedy(model, tokenizer, row["prompt"], 4, special_tokens=False)
