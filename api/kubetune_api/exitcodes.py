"""The trainer's exit codes, most of which mean "a retry cannot help".

The operator's podFailurePolicy fails the Job at once on these, and its status names the reason
(:data:`kubetune_api.reasons.EXIT_CODE_REASONS`).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of ``python -m kubetune_trainer`` besides 0 (success) and 1 (a crash)."""

    meaning: str
    retryable: bool

    def __new__(cls, value: int, meaning: str, retryable: bool = False) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.retryable = retryable
        return member

    INVALID_DATA = 42, "bad records, or input objects that are missing or unreadable"
    INVALID_CONFIG = 43, "the config is unreadable, or inconsistent with the hardware or the output prefix"
    WORLD_SIZE_MISMATCH = 44, "the launcher started a different number of processes than GPUs were requested"
    SCRATCH_TOO_SMALL = 45, "the model and data do not fit the scratch disk (resources.scratch)"
    #: Retried by the Job, as the next two: the user can fix the cause (create the bucket or
    #: the Secret, grant access, bring the server back) without changing the spec.
    OUTPUT_NOT_WRITABLE = 46, "the output prefix cannot be written: no such bucket, or access denied", True
    SECRET_MISSING = 47, "a Secret (or a key of it) that the spec names does not exist in the namespace", True
    STORAGE_UNREACHABLE = 48, "the object store cannot be reached at storage.endpoint", True


#: The codes where retrying the same pod with the same input fails the same way.
NON_RETRYABLE: tuple[int, ...] = tuple(int(code) for code in ExitCode if not code.retryable)

#: What the trainer exits with after SIGTERM (128 + 15), once it has saved a checkpoint if it was
#: training: the pod was stopped, the run was not at fault.
TERMINATED_EXIT_CODE = 143
