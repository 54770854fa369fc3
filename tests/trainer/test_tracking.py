"""spec.tracking against real parts: a real MLflow tracking server (``mlflow server``, sqlite
backend) started here, the real entrypoint training the tiny Llama against the local S3 server,
and TensorBoard's own event reader on the files the trainer uploaded.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.trainer import SecretFilesSpec
from kubetune_trainer import preflight, tracking
from kubetune_trainer.errors import SecretMissingError

from .conftest import RECORDS, TrainerRun, to_jsonl, upload_folder

#: Bounds of the server's start and stop, in seconds.
SERVER_START_TIMEOUT = 120
SERVER_STOP_TIMEOUT = 20
JOB = {"name": "tracked", "namespace": "team-a", "uid": "5f0c3d9e-1111-4000-8000-00000000abcd"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend), stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert proc.poll() is None, (root / "server.log").read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:  # noqa: S310 - loopback
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not up in {SERVER_START_TIMEOUT}s")
            time.sleep(0.5)
        yield uri
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(SERVER_STOP_TIMEOUT)
        log.close()


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _prepare(run: TrainerRun, s3_client: Any, model_dir: Path, steps: int, rows: int = 32) -> None:
    upload_folder(s3_client, model_dir, run.bucket, "models/tiny")
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=to_jsonl(RECORDS["alpaca"](rows)))
    run.config["training"].update({"maxSteps": steps, "loggingSteps": 1})
    run.config["reporting"].update(JOB)  # no such FineTuneJob: its status patches fail, logged once


def _runs(uri: str, experiment: str) -> list[Any]:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs: list[Any] = client.search_runs([exp.experiment_id])
    return runs


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _loss_scalars(event_dir: Path) -> dict[int, float]:
    """Every ``train/loss`` scalar in the event files, by step, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[int, float] = {}
    for path in sorted(event_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            found.update({event.step: event.value for event in acc.Scalars("train/loss")})
    return found


@pytest.mark.s3
@pytest.mark.slow
def test_mlflow_run_and_tensorboard_events_of_a_real_run(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    _prepare(run, s3_client, tiny_model_dir, steps=6)
    run.config["training"].update({"saveSteps": 3})
    run.config["tracking"] = {
        "tensorboard": True,
        "mlflow": {"trackingUri": mlflow_server, "experimentName": "one-shot", "tags": {"team": "nlp"}},
    }
    code, log = run.run(timeout=600)
    assert code == 0, log

    (found,) = _runs(mlflow_server, "one-shot")
    info, data = found.info, found.data
    assert info.status == "FINISHED"
    assert info.run_name == "team-a/tracked"
    output = f"s3://{bucket}/out/job-1"
    assert data.tags["kubetune.outputUri"] == output
    assert data.tags["team"] == "nlp"
    assert (data.tags["kubetune.name"], data.tags["kubetune.namespace"]) == ("tracked", "team-a")
    assert data.tags["kubetune.uid"] == JOB["uid"]
    params = data.params
    assert params["kubetune.model.source"] == f"s3://{bucket}/models/tiny"
    assert params["kubetune.method"] == "qlora"
    assert params["kubetune.lora.r"] == "8"
    assert params["kubetune.dataset.train"] == f"s3://{bucket}/data/train.jsonl"
    assert params["kubetune.output.uri"] == output
    assert params["kubetune.job.uid"] == JOB["uid"]
    # The resolved SFTConfig, logged by transformers' MLflowCallback.
    assert float(params["learning_rate"]) == pytest.approx(0.01)
    assert params["max_steps"] == "6"
    losses = _client(mlflow_server).get_metric_history(info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert {"learning_rate", "grad_norm", "final.trainLoss", "final.globalStep"} <= set(data.metrics)
    assert data.metrics["final.globalStep"] == 6

    # TensorBoard: event files under the output prefix, with one loss scalar per logged step.
    keys = _keys(s3_client, bucket, "out/job-1/tensorboard/")
    assert keys, "no event files uploaded"
    local = tmp_path / "tb"
    for key in keys:
        dest = local / key.removeprefix("out/job-1/tensorboard/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3_client.download_file(bucket, key, str(dest))
    scalars = _loss_scalars(local)
    assert sorted(scalars) == [1, 2, 3, 4, 5, 6]
    mlflow_losses = {m.step: m.value for m in losses}
    assert all(scalars[s] == pytest.approx(mlflow_losses[s], rel=1e-5) for s in scalars)


@pytest.mark.s3
@pytest.mark.slow
def test_a_resumed_pod_reopens_the_same_mlflow_run(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path, mlflow_server: str, tmp_path: Path
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    _prepare(run, s3_client, tiny_model_dir, steps=16)
    run.config["training"].update({"saveSteps": 4, "saveTotalLimit": 4})
    run.config["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experimentName": "resumed"}}

    proc = run.start("first.log")
    marker = "out/job-1/checkpoints/step-4/_COMPLETE"
    try:
        deadline = time.monotonic() + 300
        while marker not in _keys(s3_client, bucket, "out/job-1/checkpoints/"):
            assert proc.poll() is None, (run.work / "first.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # like a node loss: the run is left RUNNING
        proc.wait(30)
    (first,) = _runs(mlflow_server, "resumed")
    assert first.info.status == "RUNNING"

    run.config["workDir"] = str(tmp_path / "scratch-2")  # a new pod
    code, log = run.run(log_name="second.log")
    assert code == 0, log
    assert f"tracking: MLflow run {first.info.run_id} resumed" in log
    (again,) = _runs(mlflow_server, "resumed")
    assert again.info.run_id == first.info.run_id
    assert again.info.status == "FINISHED"
    steps = {m.step for m in _client(mlflow_server).get_metric_history(again.info.run_id, "loss")}
    # The steps after the checkpoint come from the second pod; those before it from the first
    # (logged asynchronously: a SIGKILL may lose the last of them).
    assert set(range(5, 17)) <= steps <= set(range(1, 17))
    assert 1 in steps


@pytest.mark.s3
@pytest.mark.slow
def test_a_tracking_server_that_is_down_does_not_fail_training(
    trainer_run: TrainerRun, s3_client: Any, tiny_model_dir: Path
) -> None:
    run, bucket = trainer_run, trainer_run.bucket
    _prepare(run, s3_client, tiny_model_dir, steps=2)
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    run.config["tracking"] = {"mlflow": {"trackingUri": down, "experimentName": "never"}}
    started = time.monotonic()
    code, log = run.run(timeout=600)
    assert code == 0, log
    assert f"tracking: MLflow at {down} failed to start" in log
    assert "training goes on without MLflow" in log
    assert "out/job-1/manifest.json" in _keys(s3_client, bucket, "out/job-1/")
    assert "out/job-1/mlflow-run.json" not in _keys(s3_client, bucket, "out/job-1/")
    assert time.monotonic() - started < 300


@pytest.mark.s3
def test_a_failed_run_ends_failed(trainer_run: TrainerRun, s3_client: Any, mlflow_server: str) -> None:
    """Invalid data (exit 42) fails before any model is loaded: the MLflow run says FAILED."""
    run = trainer_run
    s3_client.put_object(Bucket=run.bucket, Key="data/train.jsonl", Body=b'{"instruction": "no output"}\n')
    run.config["reporting"].update(JOB)
    run.config["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experimentName": "failing"}}
    code, log = run.run(timeout=300)
    assert code == 42, log
    (found,) = _runs(mlflow_server, "failing")
    assert found.info.status == "FAILED"
    assert "kubetune.outputUri" not in found.data.tags


def test_mlflow_credentials_are_read_from_the_secret_files(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "username").write_text("alice")
    (tmp_path / "password").write_text("s3cret\n")
    assert tracking.credentials_env("token", tmp_path) == {"MLFLOW_TRACKING_TOKEN": "tok-123"}
    assert tracking.credentials_env("basic", tmp_path) == {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
    }
    assert tracking.credentials_env(None, tmp_path) == {}


@pytest.mark.parametrize(("kind", "present"), [("token", ()), ("basic", ("username",))])
def test_a_missing_mlflow_secret_is_secret_missing(
    tmp_path: Path, kind: str, present: tuple[str, ...]
) -> None:
    """Mounted optional and empty (or without a key): exit 47, naming the field, like the storage Secret."""
    for name in present:
        (tmp_path / name).write_text("x")
    mounted = SecretFilesSpec(mlflow_credentials=kind)  # type: ignore[arg-type]
    with pytest.raises(SecretMissingError, match=r"tracking\.mlflow\.credentialsSecretRef"):
        preflight.check_secret_files(mounted, mlflow_dir=tmp_path)
    for name in ("token", "username", "password"):
        (tmp_path / name).write_text("x")
    preflight.check_secret_files(mounted, mlflow_dir=tmp_path)
