"""S3-compatible object storage: the trainer's only way in and out.

boto3 does the work: botocore's ``standard`` retry mode (throttling, 5xx and
connection errors with backoff) and s3transfer's multipart uploads/downloads.
botocore's backoff for a refused connection adds up to a few seconds at most (50 ms doubling,
``storage.maxAttempts`` tries), so the writes that carry finished work (checkpoints and the
result) also go through :func:`ride_out_outage`, which waits out a store that is down for a
while (restarted, failed over) instead of losing the run's progress to a crash.
Credentials come from the mounted Secret files (:mod:`.credentials`), else boto3's own chain
(``AWS_*`` variables, a mounted web identity token, an instance profile), never from the config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kubetune_api.spec import StorageSpec, split_s3_uri

from .errors import ObjectAccessError, ObjectDeleteError, StorageUnreachableError

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

#: Error codes that no retry can fix: the object or bucket is missing, or access is denied.
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_MI = 1024 * 1024
#: DeleteObjects rounds per batch (the first try included), and the pause before the second.
_DELETE_ATTEMPTS = 3
_DELETE_BACKOFF_S = 0.25
#: Answers that mean the store is briefly unable to serve (a restart, a failover, overload).
_UNAVAILABLE = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
}  # fmt: skip
#: How long :func:`ride_out_outage` waits for an unreachable store, in all, before it gives up.
OUTAGE_BUDGET_S = 300.0
#: The pauses between its tries (the last one repeats), each after botocore's own retries.
OUTAGE_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 10.0)

T = TypeVar("T")


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/out", "checkpoints", "step-5")`` -> ``"s3://b/out/checkpoints/step-5"``."""
    pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def failure_types() -> tuple[type[Exception], ...]:
    """What an :class:`ObjectStore` call raises when the store fails it, for callers that can go on."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ObjectAccessError, ObjectDeleteError, ClientError, BotoCoreError)


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store could not be reached or could not serve just now.

    Connection refused, reset or timed out (after botocore's own retries), or a 5xx/SlowDown
    answer; also when boto3's upload wrapper (``S3UploadFailedError``) carries one. Not found,
    access denied and other refusals are not: no waiting fixes them.
    """
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    seen: BaseException | None = exc
    for _ in range(4):  # the exception and what it was raised from (or while handling)
        if seen is None:
            break
        if isinstance(seen, BotoConnectionError | HTTPClientError) or _error_code(seen) in _UNAVAILABLE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def ride_out_outage(
    what: str,
    call: Callable[[], T],
    *,
    endpoint: str | None = None,
    budget_s: float = OUTAGE_BUDGET_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, tried again while the store is unavailable (:func:`is_unavailable`), for up to
    ``budget_s`` seconds in all; each wait is logged. Other errors are raised as they are; when the
    budget is spent, :class:`StorageUnreachableError` (exit 48, retried by the Job) naming
    ``endpoint`` (``storage.endpoint``).

    For idempotent writes only (a PUT of the same bytes to the same key): a request that failed
    may or may not have reached the store.
    """
    waited_since: float | None = None
    pauses = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            now = clock()
            waited_since = now if waited_since is None else waited_since
            pause = OUTAGE_PAUSES_S[min(pauses, len(OUTAGE_PAUSES_S) - 1)]
            if now - waited_since + pause > budget_s:
                detail = f"{what}: unavailable for {now - waited_since:.0f}s, the last error: {exc}"
                raise StorageUnreachableError(endpoint, detail) from exc
            log.warning(
                "storage: %s failed (%s); retrying in %.0fs (unavailable for %.0fs, waiting up to %.0fs)",
                what,
                exc,
                pause,
                now - waited_since,
                budget_s,
            )
            sleep(pause)
            pauses += 1
            continue
        if waited_since is not None:
            log.info("storage: %s done after %.1fs of waiting for the store", what, clock() - waited_since)
        return result


@dataclass
class ObjectStore:
    """A thin typed layer over one boto3 S3 client."""

    client: S3Client
    transfer: TransferConfig
    #: ``storage.endpoint`` (None: AWS S3), for messages.
    endpoint: str | None = None

    @classmethod
    def from_spec(cls, spec: StorageSpec) -> ObjectStore:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            region_name=spec.region,
            retries={"mode": "standard", "max_attempts": spec.max_attempts},
            s3={"addressing_style": spec.addressing_style},
            connect_timeout=10,
            read_timeout=120,
            # Many S3-compatible servers reject the CRC trailers newer botocore sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        from .credentials import session_with_secret_files

        # The credential chain starts with the Secret files the operator mounts (credentials.py).
        session = boto3.session.Session(botocore_session=session_with_secret_files())
        client = session.client("s3", endpoint_url=spec.endpoint, config=config)
        part = spec.part_size_mi * _MI
        transfer = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=spec.max_concurrency
        )
        return cls(client=client, transfer=transfer, endpoint=spec.endpoint)

    def _wrap(self, exc: Exception, uri: str) -> Exception:
        code = _error_code(exc)
        if code in _NOT_FOUND:
            return ObjectAccessError(uri, f"not found ({code})")
        if code in _DENIED:
            return ObjectAccessError(uri, f"access denied ({code})")
        return exc

    # -- reading ---------------------------------------------------------------
    def download_file(self, uri: str, dest: Path) -> Path:
        """Download one object to ``dest`` (multipart for large objects)."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(bucket, key, str(dest), Config=self.transfer)
        except ClientError as exc:
            raise self._wrap(exc, uri) from exc
        return dest

    def list_keys(self, prefix_uri: str) -> Iterator[tuple[str, int]]:
        """Every ``(key, size)`` under ``prefix_uri`` (treated as a folder)."""
        for key, size, _etag in self.list_objects(prefix_uri):
            yield key, size

    def list_objects(self, prefix_uri: str) -> Iterator[tuple[str, int, str]]:
        """Every ``(key, size, ETag)`` under ``prefix_uri`` (treated as a folder)."""
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3_uri(prefix_uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj.get("Size", 0), obj.get("ETag", "")
        except ClientError as exc:
            raise self._wrap(exc, prefix_uri) from exc

    def list_folders(self, prefix_uri: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix_uri``."""
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3_uri(prefix_uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(prefix) :].rstrip("/"))
        except ClientError as exc:
            raise self._wrap(exc, prefix_uri) from exc
        return names

    def download_folder(self, prefix_uri: str, dest: Path) -> list[Path]:
        """Download every object under ``prefix_uri`` into ``dest``, keeping relative paths."""
        bucket, prefix = split_s3_uri(prefix_uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        items: list[tuple[str, Path]] = []
        for key, _size in self.list_keys(prefix_uri):
            rel = key[len(prefix) :]
            if rel and not rel.endswith("/"):
                items.append((f"s3://{bucket}/{key}", dest / rel))
        if not items:
            raise ObjectAccessError(prefix_uri, "no objects under this prefix")
        return self.download_many(items)

    def download_many(self, items: list[tuple[str, Path]]) -> list[Path]:
        """Download each ``(uri, dest)`` through one s3transfer TransferManager: up to
        ``storage.maxConcurrency`` requests at once across the files and the parts of large ones
        (a loop of ``download_file`` runs one file at a time). The first failure cancels the rest."""
        from boto3.s3.transfer import create_transfer_manager
        from botocore.exceptions import ClientError

        for _, dest in items:
            dest.parent.mkdir(parents=True, exist_ok=True)
        with create_transfer_manager(self.client, self.transfer) as manager:
            futures = [(uri, manager.download(*split_s3_uri(uri), str(dest))) for uri, dest in items]
            for uri, future in futures:
                try:
                    future.result()
                except ClientError as exc:
                    raise self._wrap(exc, uri) from exc
        return [dest for _, dest in items]

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise self._wrap(exc, uri) from exc
        return True

    def size(self, uri: str) -> int:
        """The size of one object in bytes."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            raise self._wrap(exc, uri) from exc

    def get_bytes(self, uri: str) -> bytes:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise self._wrap(exc, uri) from exc

    # -- writing ---------------------------------------------------------------
    def ride_out(self, what: str, call: Callable[[], T]) -> T:
        """``call()`` through :func:`ride_out_outage`: waits out this store being unavailable."""
        return ride_out_outage(what, call, endpoint=self.endpoint)

    def upload_file(self, path: Path, uri: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.upload_file(str(path), bucket, key, Config=self.transfer)
        except (ClientError, S3UploadFailedError) as exc:
            raise self._wrap(exc, uri) from exc

    def upload_folder(self, folder: Path, prefix_uri: str, *, ride_out: bool = False) -> list[str]:
        """Upload every file under ``folder``; return the relative names, sorted.

        With ``ride_out``, each file waits out an unavailable store (:meth:`ride_out`).
        """
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        for name in names:
            uri = join_uri(prefix_uri, name)
            if ride_out:
                self.ride_out(f"upload of {uri}", partial(self.upload_file, folder / name, uri))
            else:
                self.upload_file(folder / name, uri)
        return names

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except ClientError as exc:
            raise self._wrap(exc, uri) from exc

    def delete(self, uri: str) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise self._wrap(exc, uri) from exc

    def _delete_keys(self, bucket: str, keys: list[str], prefix_uri: str) -> dict[str, str]:
        """One DeleteObjects call; the keys it kept, each with ``"Code: message"``."""
        from botocore.exceptions import ClientError

        batch: Any = [{"Key": k} for k in keys]
        try:
            answer = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except ClientError as exc:
            raise self._wrap(exc, prefix_uri) from exc
        kept: dict[str, str] = {}
        for error in answer.get("Errors", []):
            code, message = error.get("Code", "unknown"), error.get("Message")
            kept[error.get("Key", "?")] = f"{code}: {message}" if message else code
        return kept

    def delete_folder(self, prefix_uri: str) -> int:
        """Delete every object under ``prefix_uri``; return how many.

        DeleteObjects answers 200 even when it kept some keys: they come back in its ``Errors``
        list (access denied, object lock, a per-key InternalError or SlowDown). botocore retries
        only failed requests, never these, so the kept keys are sent again a bounded number of
        times; keys still kept raise :class:`ObjectDeleteError` naming them.
        """
        bucket, _ = split_s3_uri(prefix_uri)
        keys = [key for key, _ in self.list_keys(prefix_uri)]
        failed: dict[str, str] = {}
        for start in range(0, len(keys), 1000):
            pending = keys[start : start + 1000]
            for attempt in range(_DELETE_ATTEMPTS):
                if attempt:
                    log.info("storage: retrying %d key(s) not deleted under %s", len(pending), prefix_uri)
                    time.sleep(_DELETE_BACKOFF_S * 2 ** (attempt - 1))
                kept = self._delete_keys(bucket, pending, prefix_uri)
                pending = [k for k in pending if k in kept]
                if not pending:
                    break
            failed.update({k: kept[k] for k in pending})
        if failed:
            raise ObjectDeleteError(prefix_uri, failed, len(keys))
        return len(keys)
