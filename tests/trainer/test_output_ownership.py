"""A run never reuses or resumes from what a differently configured run wrote to its output.

Both checks happen before any model is loaded, against the real local S3 server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.trainer import TrainerConfig
from kubetune_localenv import tinymodel

from .conftest import TrainerRun


def _prepare(trainer_run: TrainerRun, s3_client: Any) -> str:
    bucket = trainer_run.bucket
    body = tinymodel.to_jsonl(tinymodel.alpaca_records(8))
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=body)
    fingerprint = TrainerConfig.model_validate(trainer_run.config).fingerprint()
    return fingerprint


@pytest.mark.parametrize("where", ["manifest.json", "checkpoints/step-6/_COMPLETE"])
def test_output_written_by_another_configuration_is_refused(
    where: str, trainer_run: TrainerRun, s3_client: Any
) -> None:
    _prepare(trainer_run, s3_client)
    bucket = trainer_run.bucket
    record = {"step": 6, "files": [], "fingerprint": "f" * 64}
    s3_client.put_object(Bucket=bucket, Key=f"out/job-1/{where}", Body=json.dumps(record).encode())

    code, log = trainer_run.run(timeout=120)

    assert code == ExitCode.INVALID_CONFIG, log
    assert f"s3://{bucket}/out/job-1" in log
    assert "different configuration" in log
    assert "precision:" not in log  # refused before the model was loaded
    summary = json.loads(trainer_run.termination_path.read_text())
    assert "set a new output.uri" in summary["error"]
    # Nothing of the other run was deleted.
    assert s3_client.head_object(Bucket=bucket, Key=f"out/job-1/{where}")


def test_result_of_the_same_configuration_is_reused(trainer_run: TrainerRun, s3_client: Any) -> None:
    fingerprint = _prepare(trainer_run, s3_client)
    bucket = trainer_run.bucket
    manifest = {"files": [], "outputUri": f"s3://{bucket}/out/job-1", "fingerprint": fingerprint}
    metrics = {"phase": "Succeeded", "globalStep": 12, "trainLoss": 1.0}
    s3_client.put_object(Bucket=bucket, Key="out/job-1/metrics.json", Body=json.dumps(metrics).encode())
    s3_client.put_object(Bucket=bucket, Key="out/job-1/manifest.json", Body=json.dumps(manifest).encode())

    code, log = trainer_run.run(timeout=120)

    assert code == 0, log
    assert "already published" in log
    assert json.loads(trainer_run.termination_path.read_text())["alreadyComplete"] is True


def test_fingerprint_ignores_connection_and_reporting_settings(trainer_run: TrainerRun) -> None:
    base = TrainerConfig.model_validate(trainer_run.config)
    moved = base.model_copy(
        update={
            "storage": base.storage.model_copy(update={"endpoint": "http://elsewhere:9000"}),
            "reporting": base.reporting.model_copy(update={"name": "renamed"}),
        }
    )
    retuned = base.model_copy(update={"training": base.training.model_copy(update={"learning_rate": 0.5})})
    assert moved.fingerprint() == base.fingerprint()
    assert retuned.fingerprint() != base.fingerprint()


def test_fingerprint_is_stable_across_releases() -> None:
    """Pinned: every marker and manifest records it, so a change makes all existing output foreign.

    Fields at their defaults are left out, so adding a defaulted API field keeps this value.
    """
    config = TrainerConfig.model_validate(
        {
            "model": {"source": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run"},
        }
    )
    assert config.fingerprint() == "b4d177ab2675f4954d35e2c14ad27350d1a626fa523bfc91a1276800366da0b0"
