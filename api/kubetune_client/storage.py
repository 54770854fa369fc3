"""The object-storage edge: a boto3 client for a FineTuneJob's ``spec.storage``.

The endpoint, region and addressing style come from the spec (or an override, for a laptop that
reaches the store under another address than the trainer pod does); the credentials come from
boto3's own chain on this machine: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``
and ``~/.aws``, SSO, an instance profile. The spec's Secret reference is the trainer's, never read
here. Transfers go through s3transfer (``download_file``); the layout is read with the trainer's
own listing code (:mod:`kubetune_trainer.checkpoints`), so both agree on what a checkpoint is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api.spec import StorageSpec, split_s3_uri
from kubetune_trainer.storage import ObjectStore

from .errors import KubetuneError, NotReadyError, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (the same keys the FineTuneJob's "
    "storage Secret holds, or any with read access to the output)"
)


@dataclass(frozen=True)
class StorageOptions:
    """How this machine reaches object storage, where it differs from what the spec says."""

    endpoint: str | None = None
    """Endpoint URL to use instead of ``spec.storage.endpoint`` (``--s3-endpoint``)."""
    profile: str | None = None
    """AWS profile to take the credentials from (``--aws-profile``); unset: boto3's default chain."""


def s3_client(spec: StorageSpec, options: StorageOptions) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=spec.region,
        retries={"mode": "standard", "max_attempts": spec.max_attempts},
        s3={"addressing_style": spec.addressing_style},
        connect_timeout=10,
        read_timeout=120,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(profile_name=options.profile)
    client: S3Client = session.client("s3", endpoint_url=options.endpoint or spec.endpoint, config=config)
    return client


def object_store(spec: StorageSpec, options: StorageOptions) -> ObjectStore:
    """The trainer's typed layer over our own client (credentials from this machine)."""
    from boto3.s3.transfer import TransferConfig

    return ObjectStore(client=s3_client(spec, options), transfer=TransferConfig(), endpoint=spec.endpoint)


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn boto3's (and the trainer store's) failures while reading ``uri`` into :class:`StorageError`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from kubetune_trainer.errors import TrainerError

    try:
        yield
    except KubetuneError:
        raise
    except NoCredentialsError as exc:
        raise StorageError(f"no object-storage credentials to read {uri}: {_CREDENTIALS_HINT}") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        hint = f"; {_CREDENTIALS_HINT}" if code in {"403", "AccessDenied", "InvalidAccessKeyId"} else ""
        raise StorageError(f"cannot read {uri}: {exc}{hint}") from exc
    except (BotoCoreError, TrainerError) as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def read_object(store: ObjectStore, uri: str, what: str) -> bytes:
    """One object's bytes; a missing one is :class:`NotReadyError` saying ``what`` it is."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    with storage_errors(uri):
        try:
            body: bytes = store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                raise NotReadyError(f"no {what} at {uri} yet") from exc
            raise
    return body


def download(store: ObjectStore, uri: str, dest: Path) -> None:
    """One object to ``dest`` through s3transfer (multipart, parallel for large objects)."""
    bucket, key = split_s3_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(uri):
        store.client.download_file(bucket, key, str(dest), Config=store.transfer)


def any_object(store: ObjectStore, uri: str) -> Any:
    """Whether any object lies under the folder ``uri`` (for messages)."""
    with storage_errors(uri):
        return next(iter(store.list_keys(uri)), None) is not None
