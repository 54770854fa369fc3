"""Fixtures for the trainer tests: a tiny random Llama, a tiny tokenizer, datasets, a runner.

The model is built once per session from a LlamaConfig with tiny dimensions and
a WordLevel tokenizer trained on the test data, saved like a real model folder,
and uploaded to each test's bucket like a real base model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Bytecode cache for torch/transformers/trl, outside the repository and the venv. The venv ships
#: no .pyc files and PYTHONDONTWRITEBYTECODE is set here, so without it every trainer process
#: compiles those libraries from source again (about 30 s of CPU each on this machine).
PYCACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune" / "pycache"
if sys.pycache_prefix is None:
    sys.pycache_prefix = str(PYCACHE)
    sys.dont_write_bytecode = False

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ROLE_WORDS = "<|user|> <|assistant|> <|system|> ### Human: Assistant: name the color after what follows comes"


def _next(color: str) -> str:
    return COLORS[(COLORS.index(color) + 1) % len(COLORS)]


def alpaca_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"instruction": "name the color after", "input": c, "output": f"{_next(c)} comes after {c}"}
        for c in (COLORS[i % len(COLORS)] for i in range(n))
    ]


def chat_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"what follows {c}"},
                {"role": "assistant", "content": f"{_next(c)} follows {c}"},
            ]
        }
        for c in (COLORS[i % len(COLORS)] for i in range(n))
    ]


def prompt_completion_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"prompt": f"after {c} comes", "completion": f" {_next(c)} then {_next(_next(c))}"}
        for c in (COLORS[i % len(COLORS)] for i in range(n))
    ]


def text_records(n: int = 32) -> list[dict[str, Any]]:
    return [
        {"text": f"### Human: what follows {c} ### Assistant: {_next(c)} follows {c}"}
        for c in (COLORS[i % len(COLORS)] for i in range(n))
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
    """A WordLevel tokenizer over the test vocabulary, wrapped as a transformers fast tokenizer."""
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 64) with its tokenizer (no chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def upload_folder(s3_client: Any, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@dataclass
class TrainerRun:
    """A prepared run: config on disk, environment, and what it points at."""

    bucket: str
    work: Path
    env: dict[str, str]
    config: dict[str, Any]

    @property
    def config_path(self) -> Path:
        return self.work / "config.json"

    @property
    def termination_path(self) -> Path:
        return self.work / "termination-log"

    def write_config(self) -> Path:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        return self.config_path

    def start(self, log_name: str = "trainer.log") -> subprocess.Popen[bytes]:
        self.write_config()
        log = (self.work / log_name).open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(self.config_path)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def run(self, timeout: float = 600, log_name: str = "trainer.log") -> tuple[int, str]:
        proc = self.start(log_name)
        try:
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        return code, (self.work / log_name).read_text(errors="replace")


def base_config(bucket: str, work: Path, *, fmt_file: str = "train.jsonl") -> dict[str, Any]:
    return {
        "model": {"source": f"s3://{bucket}/models/tiny"},
        "dataset": {"train": f"s3://{bucket}/data/{fmt_file}"},
        "method": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "perDeviceTrainBatchSize": 4,
            "maxSteps": 12,
            "learningRate": 0.01,
            "loggingSteps": 1,
            "saveSteps": 6,
            "saveTotalLimit": 2,
            "maxSeqLength": 64,
            "warmupSteps": 0,
        },
        "output": {"uri": f"s3://{bucket}/out/job-1"},
        "reporting": {"terminationMessagePath": str(work / "termination-log")},
        "workDir": str(work / "scratch"),
    }


@pytest.fixture
def trainer_run(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> TrainerRun:
    """A run against a fresh bucket; the test uploads data and adjusts ``config`` as needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_JOB_", "KUBECONFIG"))}
    env.update(s3_env)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix or str(PYCACHE)
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    return TrainerRun(bucket=bucket, work=tmp_path, env=env, config=base_config(bucket, tmp_path))
