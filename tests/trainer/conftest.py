"""Fixtures for the trainer tests: a tiny random Llama, datasets, a runner, a FineTuneJob.

The model (``kubetune_localenv.tinymodel``: a LlamaConfig with tiny dimensions and a
WordLevel tokenizer trained on the test data) is built once per session, saved like a
real model folder, and uploaded to each test's bucket like a real base model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import crd
from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_localenv.tinymodel import (
    RECORDS,
    alpaca_records,
    build_model,
    build_tokenizer,
    chat_records,
    to_jsonl,
    upload_folder,
)
from kubetune_trainer.reporting import JobRef

__all__ = [
    "RECORDS",
    "TrainerRun",
    "alpaca_records",
    "build_tokenizer",
    "chat_records",
    "to_jsonl",
    "upload_folder",
]

CRD_FILE = Path(__file__).resolve().parents[2] / crd.CRD_FILE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (2 layers, hidden 64) with its tokenizer (no chat template)."""
    return build_model(tmp_path_factory.mktemp("tiny-llama"))


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
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    return TrainerRun(bucket=bucket, work=tmp_path, env=env, config=base_config(bucket, tmp_path))


@pytest.fixture
def finetunejob(local_env: Any, kube_api: Any, namespace: str) -> JobRef:
    """The real CRD applied to the real apiserver, and one FineTuneJob in a fresh namespace."""
    from kubernetes import client

    local_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    local_env.wait_established("finetunejobs.kubetune.dev")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": "progress-test"},
        "spec": {
            "model": {"source": "s3://models/tiny"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/progress-test"},
        },
    }
    api = client.CustomObjectsApi(kube_api)
    deadline = time.monotonic() + 30
    while True:  # the new CRD's REST endpoint can lag "Established" by a moment
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            break
        except client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return JobRef(namespace=namespace, name="progress-test")
