"""What can go wrong for a user of the SDK or the CLI, each with the CLI's exit code.

One class per thing the user does something different about: no cluster to talk to, a cluster
without kubetune's CRD, a FineTuneJob that is not there, credentials without the rights, a run
that failed, a result that is not published yet, a download whose bytes do not match the manifest.
The codes are distinct and stable so scripts can branch on them; 42 is the trainer's own code for
invalid data (``kubetune_api.ExitCode.INVALID_DATA``), so ``kubetune validate`` fails as the
trainer would.
"""

from __future__ import annotations

from enum import IntEnum

from kubetune_api.exitcodes import ExitCode


class Exit(IntEnum):
    """The CLI's exit codes (0 is success; typer uses 2 for a wrong command line)."""

    ERROR = 1
    USAGE = 2
    NO_CLUSTER = 3
    CRD_NOT_INSTALLED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 6
    INVALID_SPEC = 7
    ALREADY_EXISTS = 8
    JOB_FAILED = 9
    TIMEOUT = 10
    STORAGE = 11
    NOT_READY = 12
    CHECKSUM_MISMATCH = 13
    LOGS_UNAVAILABLE = 14
    JOB_CANCELLED = 15
    INVALID_DATA = ExitCode.INVALID_DATA


class KubetuneError(Exception):
    """Base class: a message for a human and the exit code that reports it."""

    exit_code: Exit = Exit.ERROR


class NoClusterError(KubetuneError):
    """No kubeconfig, an unknown context, or an API server that does not answer."""

    exit_code = Exit.NO_CLUSTER


class CrdNotInstalledError(KubetuneError):
    """The cluster answers, but serves no FineTuneJob resource (the CRD is not installed)."""

    exit_code = Exit.CRD_NOT_INSTALLED


class NotFoundError(KubetuneError):
    """No FineTuneJob (or trainer pod) of that name in the namespace."""

    exit_code = Exit.NOT_FOUND


class PermissionDeniedError(KubetuneError):
    """The API server refused the credentials (401) or the action (403, RBAC)."""

    exit_code = Exit.PERMISSION_DENIED


class InvalidSpecError(KubetuneError):
    """The spec or manifest does not validate (here, with the API models, or at the API server)."""

    exit_code = Exit.INVALID_SPEC


class AlreadyExistsError(KubetuneError):
    """A FineTuneJob of that name exists already."""

    exit_code = Exit.ALREADY_EXISTS


class JobFailedError(KubetuneError):
    """The run ended in phase Failed; ``reason`` is ``status.reason`` (e.g. InvalidDataset)."""

    exit_code = Exit.JOB_FAILED

    def __init__(self, name: str, reason: str | None, message: str | None) -> None:
        self.name = name
        self.reason = reason
        self.message = message
        detail = f": {message}" if message else ""
        super().__init__(f"FineTuneJob {name} failed ({reason or 'no reason given'}){detail}")


class JobCancelledError(KubetuneError):
    """The run was cancelled (phase Cancelled), where the caller asked for its result."""

    exit_code = Exit.JOB_CANCELLED

    def __init__(self, name: str, message: str | None) -> None:
        self.name = name
        self.message = message
        detail = f": {message}" if message else ""
        super().__init__(f"FineTuneJob {name} was cancelled{detail}")


class WaitTimeoutError(KubetuneError):
    """The run did not reach a terminal phase in time."""

    exit_code = Exit.TIMEOUT


class StorageError(KubetuneError):
    """Object storage refused or could not be reached (or no credentials for it were found)."""

    exit_code = Exit.STORAGE


class NotReadyError(KubetuneError):
    """The object asked for is not there yet (no manifest: the result is not published)."""

    exit_code = Exit.NOT_READY


class ChecksumMismatchError(KubetuneError):
    """A downloaded file's size or sha256 differs from the manifest's."""

    exit_code = Exit.CHECKSUM_MISMATCH


class LogsUnavailableError(KubetuneError):
    """The API server could not fetch the trainer's log from its node."""

    exit_code = Exit.LOGS_UNAVAILABLE


class InvalidDatasetError(KubetuneError):
    """``validate`` found bad records; the message lists them as the trainer would."""

    exit_code = Exit.INVALID_DATA


class SweepFailedError(KubetuneError):
    """A FineTuneSweep ended in phase Failed (no trial reported the objective, or an invalid search
    space); the same exit code as a failed FineTuneJob, since a script treats them alike."""

    exit_code = Exit.JOB_FAILED

    def __init__(self, name: str, reason: str | None, message: str | None) -> None:
        self.name = name
        self.reason = reason
        self.message = message
        detail = f": {message}" if message else ""
        super().__init__(f"FineTuneSweep {name} failed ({reason or 'no reason given'}){detail}")
