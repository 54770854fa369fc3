"""Checks before any download: an unwritable output and a too-small scratch disk fail in seconds,
each with its own exit code and a message that says what to change (real trainer, real S3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.trainer import SecretFilesSpec, TrainerConfig
from kubetune_trainer import preflight
from kubetune_trainer.errors import SecretMissingError
from kubetune_trainer.storage import ObjectStore

from .conftest import TrainerRun, alpaca_records, to_jsonl

pytestmark = pytest.mark.s3


def _upload_data(s3_client: Any, run: TrainerRun, rows: int = 8) -> None:
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(alpaca_records(rows)))


def _termination(run: TrainerRun) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(run.termination_path.read_text())
    return summary


def test_missing_output_bucket_fails_before_any_download(s3_client: Any, trainer_run: TrainerRun) -> None:
    _upload_data(s3_client, trainer_run)
    trainer_run.config["output"]["uri"] = "s3://no-such-bucket-kubetune/out/run-1"

    code, log = trainer_run.run(timeout=120)

    assert code == ExitCode.OUTPUT_NOT_WRITABLE, log
    assert "cannot write under output.uri s3://no-such-bucket-kubetune/out/run-1" in log
    assert "NoSuchBucket" in log
    assert "create the bucket" in log
    assert _termination(trainer_run)["reason"] == "OutputNotWritableError"
    assert not (trainer_run.work / "scratch" / "data").exists()  # nothing was downloaded


def test_wrong_credentials_are_named_before_any_download(s3_client: Any, trainer_run: TrainerRun) -> None:
    _upload_data(s3_client, trainer_run)
    trainer_run.env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"

    code, log = trainer_run.run(timeout=120)

    assert code == ExitCode.OUTPUT_NOT_WRITABLE, log
    assert (
        "the access key or secret key is wrong: fix the Secret named by storage.credentialsSecretRef" in log
    )
    assert not (trainer_run.work / "scratch" / "data").exists()


def test_a_scratch_disk_too_small_for_the_data_fails_before_downloading_it(
    s3_client: Any, trainer_run: TrainerRun
) -> None:
    _upload_data(s3_client, trainer_run, rows=400)
    trainer_run.config["scratchBytes"] = 4096

    code, log = trainer_run.run(timeout=120)

    assert code == ExitCode.SCRATCH_TOO_SMALL, log
    assert "set spec.resources.scratch to at least 1Gi" in log
    assert "resources.scratch 0.0 GiB" in log
    assert not (trainer_run.work / "scratch" / "data").exists()
    # The probe object is gone again: the output prefix holds nothing.
    listed = s3_client.list_objects_v2(Bucket=trainer_run.bucket, Prefix="out/")
    assert listed.get("KeyCount", 0) == 0


def test_scratch_need_counts_the_model_folder_the_data_and_a_merged_copy(
    s3_client: Any, trainer_run: TrainerRun, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    bucket = trainer_run.bucket
    s3_client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b"x" * 1000)
    s3_client.put_object(Bucket=bucket, Key="models/tiny/model.safetensors", Body=b"w" * 5000)
    s3_client.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b"{}")
    trainer_run.config["output"]["mergeAdapter"] = True
    trainer_run.config["storage"] = {"endpoint": s3_env["AWS_ENDPOINT_URL"], "addressingStyle": "path"}
    cfg = TrainerConfig.model_validate(trainer_run.config)
    work = trainer_run.work / "scratch"
    work.mkdir()

    need = preflight.scratch_need(cfg, ObjectStore.from_spec(cfg.storage), work)

    assert (need.model, need.data, need.merged) == (5002, 1000, 5002)
    assert need.total == int((5002 * 2 + 1000) * 1.1) + 1


def test_an_empty_secret_volume_names_the_missing_secret(tmp_path: Path) -> None:
    storage, hub = tmp_path / "storage", tmp_path / "hub"
    storage.mkdir()
    hub.mkdir()
    preflight.check_secret_files(SecretFilesSpec(), storage, hub)  # none referenced: empty folders are fine
    mounted = SecretFilesSpec(storage_credentials=True, hub_token=True)
    with pytest.raises(SecretMissingError) as caught:
        preflight.check_secret_files(mounted, storage, hub)
    message = str(caught.value)
    assert (
        "storage.credentialsSecretRef: the Secret, or its key for access key id and secret access key"
        in message
    )
    assert "model.tokenSecretRef" in message
    assert "create it" in message
    (storage / "access-key-id").write_text("id")
    with pytest.raises(SecretMissingError, match="its key for secret access key "):
        preflight.check_secret_files(mounted, storage, hub)
    (storage / "secret-access-key").write_text("key")
    (hub / "token").write_text("hf_x")
    preflight.check_secret_files(mounted, storage, hub)


def test_an_endpoint_nobody_answers_is_named_and_left_to_the_jobs_retries(
    s3_client: Any, trainer_run: TrainerRun
) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    trainer_run.config["storage"] = {"endpoint": endpoint, "addressingStyle": "path", "maxAttempts": 2}

    code, log = trainer_run.run(timeout=120)

    assert code == ExitCode.STORAGE_UNREACHABLE, log
    assert ExitCode.STORAGE_UNREACHABLE.retryable  # not in the podFailurePolicy's FailJob list
    assert f"cannot reach the object store at storage.endpoint {endpoint}" in log
    assert _termination(trainer_run)["reason"] == "StorageUnreachableError"
