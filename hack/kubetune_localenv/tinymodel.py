"""A tiny random Llama, a tiny tokenizer and small datasets, made locally.

No hub downloads are possible here, so the demo and the tests build their own
model: a 2-layer Llama with hidden size 64 and a WordLevel tokenizer trained on
the very records it will be fine-tuned on. It is saved and uploaded to object
storage exactly like a real base model (``save_pretrained`` layout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ROLE_WORDS = "<|user|> <|assistant|> <|system|> ### Human: Assistant: name the color after what follows comes"


def _next(color: str) -> str:
    return COLORS[(COLORS.index(color) + 1) % len(COLORS)]


def _colors(n: int) -> list[str]:
    return [COLORS[i % len(COLORS)] for i in range(n)]


def alpaca_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"instruction": "name the color after", "input": c, "output": f"{_next(c)} comes after {c}"}
        for c in _colors(n)
    ]


def chat_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"what follows {c}"},
                {"role": "assistant", "content": f"{_next(c)} follows {c}"},
            ]
        }
        for c in _colors(n)
    ]


def prompt_completion_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"prompt": f"after {c} comes", "completion": f" {_next(c)} then {_next(_next(c))}"}
        for c in _colors(n)
    ]


def text_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"text": f"### Human: what follows {c} ### Assistant: {_next(c)} follows {c}"} for c in _colors(n)
    ]


RECORDS: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "alpaca": alpaca_records,
    "chat": chat_records,
    "prompt_completion": prompt_completion_records,
    "text": text_records,
}


def to_jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _corpus() -> list[str]:
    texts = [ROLE_WORDS]
    for make in RECORDS.values():
        texts.extend(json.dumps(r) for r in make(len(COLORS)))
    return texts


def build_tokenizer() -> Any:
    """A WordLevel tokenizer over the sample vocabulary, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        _corpus(), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def llama_config(tokenizer: Any, *, hidden: int = 64, layers: int = 2, heads: int = 4) -> Any:
    """A random-init Llama config sized by ``hidden``/``layers``/``heads`` over ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_model(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama (2 layers, hidden 64) and its tokenizer in ``folder``."""
    import torch
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def upload_folder(s3_client: Any, folder: Path, bucket: str, prefix: str) -> None:
    """Upload every file below ``folder`` to ``s3://bucket/prefix/``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
