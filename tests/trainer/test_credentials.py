"""Object-storage credentials from mounted Secret files, against the real S3 server.

The operator mounts ``spec.storage.credentialsSecretRef`` as files; the trainer's credential
provider reads them ahead of boto3's chain and re-reads them, so a rotated Secret is picked up.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kubetune_api import wellknown
from kubetune_trainer.credentials import SecretFilesProvider, session_with_secret_files

pytestmark = pytest.mark.cluster


def _write(directory: Path, access: str, secret: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / wellknown.ACCESS_KEY_ID_FILE).write_text(
        access + "\n"
    )  # kubectl create secret adds none; editors do
    (directory / wellknown.SECRET_ACCESS_KEY_FILE).write_text(secret)


def _client(local_env: Any, provider: SecretFilesProvider) -> Any:
    session = boto3.session.Session(botocore_session=session_with_secret_files(provider))
    config = Config(region_name="us-east-1", s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return session.client("s3", endpoint_url=local_env.s3.endpoint, config=config)


def test_secret_files_come_before_the_environment(
    local_env: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-from-env")
    _write(tmp_path, local_env.s3.access_key, local_env.s3.secret_key)
    client = _client(local_env, SecretFilesProvider(tmp_path))
    client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
    assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"


def test_a_rotated_secret_is_picked_up_without_a_restart(local_env: Any, bucket: str, tmp_path: Path) -> None:
    _write(tmp_path, local_env.s3.access_key, "not-the-secret")
    client = _client(local_env, SecretFilesProvider(tmp_path, reread=dt.timedelta(0)))
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key="probe", Body=b"x")
    assert refused.value.response["Error"]["Code"] in {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
    }
    _write(tmp_path, local_env.s3.access_key, local_env.s3.secret_key)  # the kubelet rewrites the file
    client.put_object(Bucket=bucket, Key="probe", Body=b"x")


def test_without_files_the_rest_of_the_chain_applies(
    local_env: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", local_env.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", local_env.s3.secret_key)
    provider = SecretFilesProvider(tmp_path / "absent")
    assert provider.load() is None
    _client(local_env, provider).put_object(Bucket=bucket, Key="probe", Body=b"x")
