"""The S3 layer and checkpoint bookkeeping against the real local S3 server (versitygw)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import StorageSpec
from kubetune_trainer.checkpoints import MARKER, list_checkpoints, prune, restore_latest, upload_checkpoint
from kubetune_trainer.errors import ObjectAccessError, ObjectDeleteError
from kubetune_trainer.storage import ObjectStore, join_uri

pytestmark = pytest.mark.s3


@pytest.fixture
def store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return ObjectStore.from_spec(StorageSpec(endpoint=s3_env["AWS_ENDPOINT_URL"], addressing_style="path"))


def _checkpoint_dir(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"checkpoint-{step}"
    (folder / "nested").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 1000)
    (folder / "nested" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def test_join_uri() -> None:
    assert join_uri("s3://b/out/", "checkpoints", "/step-5/") == "s3://b/out/checkpoints/step-5"


def test_folder_round_trip(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    src = _checkpoint_dir(tmp_path / "src", 3)
    names = store.upload_folder(src, f"s3://{bucket}/x/y")
    assert names == ["adapter_model.safetensors", "nested/trainer_state.json"]
    got = store.download_folder(f"s3://{bucket}/x/y", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in got) == names
    assert (tmp_path / "dst" / "adapter_model.safetensors").read_bytes() == bytes([3]) * 1000
    assert store.list_folders(f"s3://{bucket}/x") == ["y"]


def test_multipart_upload_and_download(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    """A file above the multipart threshold goes through s3transfer's multipart path both ways."""
    from boto3.s3.transfer import TransferConfig

    small_parts = ObjectStore(
        store.client, TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    )
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 2**20 // 256))
    small_parts.upload_file(big, f"s3://{bucket}/big.bin")
    head = store.client.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert "-" in head["ETag"]  # a multipart ETag: "<md5>-<parts>"
    small_parts.download_file(f"s3://{bucket}/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_missing_objects_and_buckets_are_access_errors(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    with pytest.raises(ObjectAccessError, match="not found"):
        store.download_file(f"s3://{bucket}/nope.jsonl", tmp_path / "nope.jsonl")
    with pytest.raises(ObjectAccessError, match="not found"):
        store.download_file("s3://no-such-bucket-kt/x.jsonl", tmp_path / "x.jsonl")
    with pytest.raises(ObjectAccessError, match="no objects under this prefix"):
        store.download_folder(f"s3://{bucket}/empty", tmp_path / "empty")
    assert not store.exists(f"s3://{bucket}/nope.jsonl")


def test_wrong_credentials_are_access_denied(
    s3_env: dict[str, str], bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    denied = ObjectStore.from_spec(StorageSpec(endpoint=s3_env["AWS_ENDPOINT_URL"]))
    with pytest.raises(ObjectAccessError, match="access denied"):
        denied.download_file(f"s3://{bucket}/train.jsonl", tmp_path / "train.jsonl")


def test_checkpoints_complete_only_with_marker_and_pruned(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    out = f"s3://{bucket}/out/job"
    for step in (2, 4, 6):
        upload_checkpoint(store, _checkpoint_dir(tmp_path, step), out, step)
    # A pod killed mid-upload: files but no marker.
    store.upload_folder(_checkpoint_dir(tmp_path / "partial", 8), join_uri(out, "checkpoints", "step-8"))
    complete, incomplete = list_checkpoints(store, out)
    assert [c.step for c in complete] == [2, 4, 6]
    assert [c.step for c in incomplete] == [8]

    assert prune(store, out, keep=2) == [2]
    assert [c.step for c in list_checkpoints(store, out)[0]] == [4, 6]

    restored = restore_latest(store, out, tmp_path / "local")
    assert restored == tmp_path / "local" / "checkpoint-6"
    assert (restored / "nested" / "trainer_state.json").read_text() == '{"global_step": 6}'
    assert not (restored / MARKER).exists()
    assert store.list_folders(join_uri(out, "checkpoints")) == ["step-4", "step-6"]  # step-8 cleaned up


def test_restore_latest_without_checkpoints(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    client: Any = store.client
    client.put_object(Bucket=bucket, Key="out/other/file", Body=b"x")
    assert restore_latest(store, f"s3://{bucket}/out/job", tmp_path) is None


# -- deletes the store refuses ---------------------------------------------------
# A legal hold (S3 object lock) makes versitygw, like AWS, keep an object and report it in
# DeleteObjects' "Errors" list of an HTTP 200 answer: real per-key errors, no mock.


@dataclass
class LockedBucket:
    """A bucket with object lock enabled; ``hold(key)`` sets an object's legal hold."""

    s3: Any
    bucket: str
    held: set[str] = field(default_factory=set)

    def hold(self, key: str, on: bool = True) -> None:
        self.s3.put_object_legal_hold(
            Bucket=self.bucket, Key=key, LegalHold={"Status": "ON" if on else "OFF"}
        )
        (self.held.add if on else self.held.discard)(key)


@pytest.fixture
def locked(s3_client: Any) -> Iterator[LockedBucket]:
    locked = LockedBucket(s3_client, "lk-" + secrets.token_hex(6))
    s3_client.create_bucket(Bucket=locked.bucket, ObjectLockEnabledForBucket=True)
    yield locked
    for key in list(locked.held):  # leave nothing locked behind in the session's server
        locked.hold(key, on=False)


def _keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    return sorted(
        o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    )


def test_delete_folder_raises_for_keys_the_store_kept(
    store: ObjectStore, s3_client: Any, locked: LockedBucket
) -> None:
    bucket = locked.bucket
    for name in "abcde":
        s3_client.put_object(Bucket=bucket, Key=f"p/{name}", Body=b"x")
    locked.hold("p/b")
    locked.hold("p/d")
    with pytest.raises(ObjectDeleteError) as info:
        store.delete_folder(f"s3://{bucket}/p")
    message = str(info.value)
    assert message.startswith(
        f"2 of 5 object(s) under s3://{bucket}/p could not be deleted: p/b (AccessDenied: "
    )
    assert "p/d (AccessDenied: " in message
    assert "object lock" in message  # the store's own reason
    assert info.value.failed.keys() == {"p/b", "p/d"}
    assert _keys(s3_client, bucket, "p/") == ["p/b", "p/d"]  # the others are gone


def test_delete_folder_retries_keys_the_store_kept(
    store: ObjectStore, s3_client: Any, locked: LockedBucket
) -> None:
    """A key refused once and accepted on the retry: the hold is lifted right after the first answer."""
    bucket = locked.bucket
    for name in "abc":
        s3_client.put_object(Bucket=bucket, Key=f"p/{name}", Body=b"x")
    locked.hold("p/c")
    answers: list[list[str]] = []

    def after_delete(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        answers.append([e["Key"] for e in parsed.get("Errors", [])])
        if len(answers) == 1:
            locked.hold("p/c", on=False)

    store.client.meta.events.register("after-call.s3.DeleteObjects", after_delete)
    assert store.delete_folder(f"s3://{bucket}/p") == 3
    assert answers == [["p/c"], []]
    assert _keys(s3_client, bucket, "p/") == []


def test_a_refused_prune_leaves_training_and_completeness_right(
    store: ObjectStore, s3_client: Any, locked: LockedBucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pruning warns and goes on; what it leaves is complete (marker kept) or incomplete, never half."""
    bucket = locked.bucket
    out = f"s3://{bucket}/out/job"
    for step in (2, 4, 6, 8):
        upload_checkpoint(store, _checkpoint_dir(tmp_path / str(step), step), out, step)
    locked.hold(f"out/job/checkpoints/step-2/{MARKER}")  # the marker stays: step 2 stays complete
    locked.hold("out/job/checkpoints/step-4/adapter_model.safetensors")  # marker gone: incomplete

    with caplog.at_level("WARNING", logger="kubetune_trainer.checkpoints"):
        assert prune(store, out, keep=2) == []
    assert "could not prune step 2" in caplog.text
    assert "could not prune step 4" in caplog.text
    assert "out/job/checkpoints/step-4/adapter_model.safetensors (AccessDenied" in caplog.text
    complete, incomplete = list_checkpoints(store, out)
    assert [c.step for c in complete] == [2, 6, 8]
    assert [c.step for c in incomplete] == [4]

    locked.hold(f"out/job/checkpoints/step-2/{MARKER}", on=False)
    assert prune(store, out, keep=2) == [2]  # retried at the next save
    # A restart cannot delete the incomplete step 4 either: it warns and resumes from step 8.
    caplog.clear()
    with caplog.at_level("WARNING", logger="kubetune_trainer.checkpoints"):
        restored = restore_latest(store, out, tmp_path / "local")
    assert restored == tmp_path / "local" / "checkpoint-8"
    assert "could not delete incomplete" in caplog.text
    assert store.list_folders(join_uri(out, "checkpoints")) == ["step-4", "step-6", "step-8"]
