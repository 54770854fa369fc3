"""Chat templates and TRL rows with a real (tiny) tokenizer: no model, no S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune_api.spec import ModelSpec
from kubetune_trainer.dataset import ValidatedData, token_stats
from kubetune_trainer.modeling import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from kubetune_trainer.sft import chat_uses_assistant_mask, to_rows

from .conftest import build_tokenizer, chat_records

PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _saved_tokenizer(tmp_path: Path, template: str | None) -> Any:
    tokenizer = build_tokenizer()
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path)
    return load_tokenizer(str(tmp_path), ModelSpec(source="s3://models/tiny"))


def test_default_template_is_prefix_preserving_and_masks_assistant_turns(tmp_path: Path) -> None:
    tokenizer = _saved_tokenizer(tmp_path, None)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert chat_uses_assistant_mask(tokenizer)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what follows red"}]
    completion = [{"role": "assistant", "content": "green follows red"}]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert head == "<|system|>\nbe brief\n<|user|>\nwhat follows red\n<|assistant|>\n"
    assert full == head + "green follows red</s>\n"
    masked = tokenizer.apply_chat_template(
        prompt + completion, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(ids).split() == ["green", "follows", "red", "</s>"]


def test_chat_without_assistant_mask_trains_on_the_last_turn(tmp_path: Path) -> None:
    tokenizer = _saved_tokenizer(tmp_path, PLAIN_TEMPLATE)
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    assert not chat_uses_assistant_mask(tokenizer)
    data = ValidatedData("chat", [r for r in chat_records(2)], [])
    train, _ = to_rows(data, assistant_mask=False)
    assert train[0]["prompt"] == [{"role": "user", "content": "what follows red"}]
    assert train[0]["completion"] == [{"role": "assistant", "content": "green follows red"}]


def test_token_stats_count_truncated_records(tmp_path: Path) -> None:
    tokenizer = _saved_tokenizer(tmp_path, None)
    rows = [
        {"text": "red green blue"},
        {"text": "red " * 40},
        {"prompt": "after red comes", "completion": " green"},
    ]
    stats = token_stats(rows, tokenizer, max_length=16)
    assert stats.records == 3
    assert stats.max == 41  # 40 words + EOS
    assert stats.truncated == 1
