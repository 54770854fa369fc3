"""Two trainer processes on CPU (gloo), launched the way the operator launches them.

The command is the operator's own (``builders.trainer_command`` for ``resources.processes: 2``:
accelerate's torch.distributed launcher) with only the config path and the accelerate binary
made local, so what runs here is what the pod runs. The checks: the world-size check on both
sides, the data split over the ranks, one upload (from rank 0) of each checkpoint and of the
result, and a 2-process checkpoint resumed by a single process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import wellknown
from kubetune_api.exitcodes import ExitCode
from kubetune_operator.builders import trainer_command

from .conftest import RECORDS, TrainerRun, to_jsonl, upload_folder

pytestmark = [pytest.mark.s3, pytest.mark.slow]

ROWS = 32
BATCH = 4
OUT = "out/job-1"


def _command(run: TrainerRun, gpus: int, processes: int | None) -> list[str]:
    """The operator's container command, with the venv's accelerate and this run's config."""
    command = trainer_command(gpus, processes)
    local = {
        "accelerate": str(Path(sys.executable).with_name("accelerate")),
        "python": sys.executable,
        wellknown.CONFIG_PATH: str(run.config_path),
    }
    return [local.get(word, word) for word in command]


def _launch(run: TrainerRun, command: list[str], log_name: str, timeout: float = 300) -> tuple[int, str]:
    run.write_config()
    log_path = run.work / log_name
    with log_path.open("wb") as log:
        proc = subprocess.run(command, env=run.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, log_path.read_text(errors="replace")


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"].removeprefix(prefix) for page in pages for obj in page.get("Contents", []))


def _json(s3_client: Any, bucket: str, key: str) -> Any:
    return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture
def two_process_run(trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path) -> TrainerRun:
    """32 alpaca rows, 4 per rank and step: with 2 ranks one epoch is 4 steps, checkpoints at 2 and 4."""
    run = trainer_run
    upload_folder(s3_client, tiny_model_dir, run.bucket, "models/tiny")
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(RECORDS["alpaca"](ROWS)))
    run.config["training"].update(
        perDeviceTrainBatchSize=BATCH, maxSteps=4, saveSteps=2, saveTotalLimit=2, loggingSteps=1
    )
    run.config["processes"] = 2
    return run


def test_world_size_must_match_processes(two_process_run: TrainerRun) -> None:
    """processes 2 started as one process, and two processes for a config that asks for one: both
    refused (exit 44) before any download."""
    run = two_process_run
    code, log = _launch(run, _command(run, 0, None), "one-for-two.log", timeout=120)
    assert code == ExitCode.WORLD_SIZE_MISMATCH, log
    assert "processes is 2, but 1 process(es) were launched" in log

    del run.config["processes"]
    code, log = _launch(run, _command(run, 0, 2), "two-for-one.log", timeout=120)
    assert code == ExitCode.WORLD_SIZE_MISMATCH, log
    assert "processes is 1, but 2 process(es) were launched" in log


def test_two_processes_split_the_data_upload_once_and_resume_with_one(
    two_process_run: TrainerRun, s3_client: Any
) -> None:
    run, bucket = two_process_run, two_process_run.bucket
    code, log = _launch(run, _command(run, 0, 2), "two.log")
    assert code == 0, log

    # Each rank's dataloader holds half the rows: 4 steps of 4 rows per rank are one epoch of 32
    # (a single process, or two that each took every row, would be at epoch 0.5), and the tokens
    # the Trainer gathered from both ranks are every row's once (each row has the same length).
    metrics = _json(s3_client, bucket, f"{OUT}/metrics.json")
    assert metrics["globalStep"] == 4
    assert metrics["epoch"] == pytest.approx(1.0)
    assert len(metrics["lossHistory"]) == 4
    stats = metrics["dataStats"]
    assert stats["tokensP50"] == stats["tokensMax"]
    assert metrics["inputTokensSeen"] == ROWS * stats["tokensMax"]

    # One upload of each checkpoint and of the result: rank 0's (rank 1 uploading too would log
    # its own line, or leave a second manifest's worth of objects).
    for step in (2, 4):
        assert log.count(f"checkpoint: step {step} synced") == 1, log
    assert log.count(f"{wellknown.MANIFEST} written to") == 1, log
    stored = _keys(s3_client, bucket, f"{OUT}/")
    manifest = _json(s3_client, bucket, f"{OUT}/{wellknown.MANIFEST}")
    results = [k for k in stored if not k.startswith("checkpoints/") and k != wellknown.MANIFEST]
    assert sorted(f["path"] for f in manifest["files"]) == results
    checkpoints = {k.split("/")[1] for k in stored if k.startswith("checkpoints/")}
    assert checkpoints == {"step-2", "step-4"}
    for folder in checkpoints:
        assert f"checkpoints/{folder}/_COMPLETE" in stored
        marker = _json(s3_client, bucket, f"{OUT}/checkpoints/{folder}/_COMPLETE")
        folder_files = [
            k for k in stored if k.startswith(f"checkpoints/{folder}/") and not k.endswith("_COMPLETE")
        ]
        assert marker["files"] == len(folder_files)

    # The store as a 2-process pod leaves it when stopped after its step-2 checkpoint: then one
    # process (processes unset: the same fingerprint) resumes from it and finishes the run.
    for key in _keys(s3_client, bucket, f"{OUT}/"):
        if key.startswith("checkpoints/step-4/") or not key.startswith("checkpoints/"):
            s3_client.delete_object(Bucket=bucket, Key=f"{OUT}/{key}")
    del run.config["processes"]
    run.config["workDir"] = str(run.work / "scratch-one")
    code, log = _launch(run, _command(run, 0, None), "one.log")
    assert code == 0, log
    assert "checkpoint: resuming from step 2" in log
    resumed = _json(s3_client, bucket, f"{OUT}/metrics.json")
    assert resumed["resumedFromStep"] == 2
    assert resumed["globalStep"] == 4
    assert log.count("{'loss'") == 2  # steps 3 and 4 only
