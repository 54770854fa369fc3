"""Waiting out an unavailable object store (storage.ride_out_outage), without a server.

The end-to-end case (versitygw stopped for 20 s mid-checkpoint and mid-publish, the same trainer
process finishing the run) is tests/faults/test_outages.py; here the rules: what counts as
"unavailable", the pauses, the budget, and that everything else is raised at once.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError

from kubetune_api.exitcodes import ExitCode
from kubetune_api.spec import StorageSpec
from kubetune_trainer import checkpoints
from kubetune_trainer.errors import ObjectAccessError, StorageUnreachableError
from kubetune_trainer.storage import OUTAGE_PAUSES_S, ObjectStore, is_unavailable, ride_out_outage


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def _upload_failed(cause: ClientError) -> S3UploadFailedError:
    """What boto3's upload_file raises for a ClientError: the wrapper, raised while handling it."""
    try:
        raise cause
    except ClientError as exc:
        try:
            raise S3UploadFailedError(f"Failed to upload: {exc}")  # as boto3 does: inside the except
        except S3UploadFailedError as wrapped:
            return wrapped


@pytest.fixture
def closed_port_store(monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    """A store whose endpoint refuses connections (nothing listens there), one attempt per call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    spec = StorageSpec(endpoint=f"http://127.0.0.1:{port}", addressing_style="path", max_attempts=1)
    return ObjectStore.from_spec(spec)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_refused_connection_is_unavailable(closed_port_store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(EndpointConnectionError) as put:
        closed_port_store.put_bytes("s3://bkt/k", b"x")
    with pytest.raises(EndpointConnectionError) as upload:  # s3transfer passes it through as is
        closed_port_store.upload_file(tmp_path / "f", "s3://bkt/f")
    assert is_unavailable(put.value)
    assert is_unavailable(upload.value)


@pytest.mark.parametrize(
    ("code", "status"), [("ServiceUnavailable", 503), ("SlowDown", 503), ("InternalError", 500)]
)
def test_5xx_answers_are_unavailable_also_inside_boto3s_upload_wrapper(code: str, status: int) -> None:
    assert is_unavailable(_client_error(code, status))
    assert is_unavailable(_upload_failed(_client_error(code, status)))


@pytest.mark.parametrize(
    ("code", "status"), [("AccessDenied", 403), ("NoSuchBucket", 404), ("InvalidRequest", 400)]
)
def test_refusals_are_not_unavailable(code: str, status: int) -> None:
    assert not is_unavailable(_client_error(code, status))
    assert not is_unavailable(_upload_failed(_client_error(code, status)))
    assert not is_unavailable(ObjectAccessError("s3://bkt/k", "access denied (AccessDenied)"))
    assert not is_unavailable(ValueError("no"))


def test_an_outage_is_waited_out_with_growing_pauses_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    calls: list[int] = []

    def put() -> str:
        calls.append(1)
        if len(calls) <= 6:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bkt/k")
        return "done"

    with caplog.at_level(logging.INFO, logger="kubetune_trainer.storage"):
        assert ride_out_outage("upload of s3://bkt/k", put, sleep=fake.sleep, clock=fake.clock) == "done"
    assert fake.sleeps == [*OUTAGE_PAUSES_S, OUTAGE_PAUSES_S[-1]]
    waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(waits) == 6
    assert waits[0].startswith("storage: upload of s3://bkt/k failed (Could not connect")
    assert "retrying in 1s" in waits[0]
    assert any("upload of s3://bkt/k done after" in r.getMessage() for r in caplog.records)


def test_the_budget_bounds_the_wait_then_the_error_is_raised() -> None:
    fake = FakeTime()

    def put() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bkt/k")

    endpoint = "http://s3.example:9000"
    with pytest.raises(StorageUnreachableError) as gave_up:
        ride_out_outage(
            "upload of s3://bkt/k", put, endpoint=endpoint, budget_s=60, sleep=fake.sleep, clock=fake.clock
        )
    assert sum(fake.sleeps) <= 60
    assert sum(fake.sleeps) > 60 - OUTAGE_PAUSES_S[-1]
    # Exit 48 (StorageUnreachable, retried by the Job), naming the endpoint, the write and the wait.
    assert gave_up.value.exit_code == ExitCode.STORAGE_UNREACHABLE
    message = str(gave_up.value)
    assert f"storage.endpoint {endpoint}" in message
    assert f"upload of s3://bkt/k: unavailable for {sum(fake.sleeps):.0f}s" in message
    assert isinstance(gave_up.value.__cause__, EndpointConnectionError)


def test_other_errors_are_raised_at_once() -> None:
    fake = FakeTime()

    def put() -> None:
        raise _upload_failed(_client_error("AccessDenied", 403))

    with pytest.raises(S3UploadFailedError):
        ride_out_outage("upload of s3://bkt/k", put, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


def test_prune_that_cannot_list_warns_and_training_goes_on(
    closed_port_store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Right after a checkpoint's marker, the store goes away: the prune's listing fails; no crash."""
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.checkpoints"):
        assert checkpoints.prune(closed_port_store, "s3://bkt/out", keep=1) == []
    assert any("could not list the checkpoints to prune" in r.getMessage() for r in caplog.records)
