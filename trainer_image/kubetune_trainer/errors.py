"""Errors that end the trainer with a specific exit code the operator understands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kubetune_api.exitcodes import ExitCode


class TrainerError(Exception):
    """Base class: an error with the process exit code that reports it."""

    exit_code: int = 1


class InvalidDataError(TrainerError):
    """Bad records, or input objects that are missing or unreadable: permanent, never retried.

    ``problems`` are lines like ``"train.jsonl line 17: missing 'output'"``;
    ``total`` counts every problem found, of which only the first few are listed.
    """

    exit_code = ExitCode.INVALID_DATA

    def __init__(self, problems: Sequence[str], total: int | None = None) -> None:
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = list(self.problems)
        if self.total > len(self.problems):
            lines.append(f"... and {self.total - len(self.problems)} more problem(s)")
        return "invalid data:\n  " + "\n  ".join(lines)


class ObjectAccessError(InvalidDataError):
    """An object that must exist is missing, or the credentials may not read or write it."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__([f"{uri}: {reason}"])


class ObjectDeleteError(TrainerError):
    """Objects under a prefix that the store refused to delete, even after retries.

    Exit code 1 (a crash, retried by the Job): the cause may pass. Callers that can go on
    without the delete (checkpoint pruning and cleanup) catch it and log a warning.
    """

    #: How many failed keys the message names.
    SHOWN = 3

    def __init__(self, prefix_uri: str, failed: Mapping[str, str], total: int) -> None:
        self.prefix_uri = prefix_uri
        self.failed = dict(failed)  # key -> "Code: message"
        shown = "; ".join(f"{key} ({why})" for key, why in list(self.failed.items())[: self.SHOWN])
        more = f"; and {len(self.failed) - self.SHOWN} more" if len(self.failed) > self.SHOWN else ""
        super().__init__(
            f"{len(self.failed)} of {total} object(s) under {prefix_uri} could not be deleted: {shown}{more}"
        )


class InvalidConfigError(TrainerError):
    """The config file is unreadable or inconsistent with the hardware."""

    exit_code = ExitCode.INVALID_CONFIG


class ForeignOutputError(InvalidConfigError):
    """``output.uri`` already holds checkpoints or a result of a differently configured run."""

    def __init__(self, uri: str, recorded: str, fingerprint: str) -> None:
        super().__init__(
            f"{uri} was written by a run with a different configuration "
            f"(fingerprint {recorded[:12]}, this run {fingerprint[:12]}): "
            "set a new output.uri, or delete what is there to train again at this one"
        )


def check_same_run(uri: str, record: dict[str, object], fingerprint: str) -> None:
    """Raise :class:`ForeignOutputError` if ``record`` (a marker or manifest) names another run.

    Records without a fingerprint predate it and are accepted.
    """
    recorded = record.get("fingerprint")
    if isinstance(recorded, str) and recorded != fingerprint:
        raise ForeignOutputError(uri, recorded, fingerprint)


class WorldSizeMismatchError(TrainerError):
    """The launcher started a different number of processes than GPUs were requested."""

    exit_code = ExitCode.WORLD_SIZE_MISMATCH


class ScratchTooSmallError(TrainerError):
    """The inputs (model, data) would not fit the scratch disk: a retry on the same pod spec cannot help."""

    exit_code = ExitCode.SCRATCH_TOO_SMALL


class OutputNotWritableError(TrainerError):
    """A probe write under ``output.uri`` was refused (no such bucket, access denied): retried,
    since the user can fix it without a new spec."""

    exit_code = ExitCode.OUTPUT_NOT_WRITABLE

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(
            f"cannot write under output.uri {uri} ({reason}): {self._hint(reason)}; the Job retries "
            "(lifecycle.backoffLimit)"
        )

    @staticmethod
    def _hint(reason: str) -> str:
        if "NoSuchBucket" in reason:
            return "create the bucket, or fix output.uri"
        if "SignatureDoesNotMatch" in reason or "InvalidAccessKeyId" in reason:
            return (
                "the access key or secret key is wrong: fix the Secret named by "
                "storage.credentialsSecretRef (a fixed Secret is read again on the next attempt)"
            )
        return (
            "give the credentials (storage.credentialsSecretRef or the pod's identity) "
            "s3:PutObject and s3:DeleteObject on this prefix"
        )


class SecretMissingError(TrainerError):
    """A Secret the spec names (or one of its keys) is missing: its volume is mounted empty."""

    exit_code = ExitCode.SECRET_MISSING


class StorageUnreachableError(TrainerError):
    """No connection to the object store after botocore's retries: retried by the Job."""

    exit_code = ExitCode.STORAGE_UNREACHABLE

    def __init__(self, endpoint: str | None, detail: str) -> None:
        where = f"storage.endpoint {endpoint}" if endpoint else "the AWS S3 endpoint (storage.endpoint unset)"
        super().__init__(
            f"cannot reach the object store at {where} ({detail}): check the scheme, host and port, "
            "and that the server is up; the Job retries (lifecycle.backoffLimit)"
        )
