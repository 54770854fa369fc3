"""Phases, condition types and every reason a FineTuneJob's status or Events carry.

One enum member per reason, with what it means and whether it is a warning (a Warning Event,
Degraded in Argo CD). Reasons that kubetune passes on from the kubelet, the scheduler or the Job
controller are listed too, so the docs' table and the Argo CD health check know them; a reason
from those components that is not listed still reaches status unchanged.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from .exitcodes import ExitCode


class Phase(StrEnum):
    """``status.phase``: one word for humans and the printer column."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


#: Phases a run never leaves.
TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED})


PHASE_MEANINGS: Final = {
    Phase.PENDING: "created; the trainer pod is not running yet (or is being retried)",
    Phase.QUEUED: "waiting for Kueue to admit the job",
    Phase.RUNNING: "the trainer is running",
    Phase.SUSPENDED: "stopped by spec.suspend; checkpoints are kept",
    Phase.SUCCEEDED: "the result and its manifest are in object storage",
    Phase.FAILED: "the run ended without a result; reason says why",
}


class ConditionType(StrEnum):
    """``status.conditions[].type``, in the order they appear."""

    CREATED = "Created"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """A reason: its value, a one-line meaning, whether it is a warning, and its phases.

    ``phases`` is empty for condition-only reasons (the reason of a False condition).
    """

    meaning: str
    warning: bool
    phases: tuple[Phase, ...]

    def __new__(cls, value: str, meaning: str, warning: bool, *phases: Phase) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.warning = warning
        member.phases = phases
        return member

    # -- Pending ---------------------------------------------------------------------------
    CREATING = (
        "Creating",
        "creating the trainer Job and its ConfigMap, ServiceAccount and Role",
        False,
        Phase.PENDING,
    )
    WAITING_FOR_CLEANUP = (
        "WaitingForCleanup",
        "a same-named object of another owner (kubectl replace --force) still holds a child's name",
        False,
        Phase.PENDING,
    )
    WAITING_FOR_POD = (
        "WaitingForPod",
        "waiting for the Job controller to create the trainer pod",
        False,
        Phase.PENDING,
    )
    POD_STARTING = "PodStarting", "the trainer pod is scheduled and starting", False, Phase.PENDING
    RETRYING = "Retrying", "an attempt failed; the Job will start another pod", False, Phase.PENDING
    RESUMING = "Resuming", "spec.suspend turned false; the Job is starting a new pod", False, Phase.PENDING
    UNSCHEDULABLE = "Unschedulable", "no node fits the trainer pod yet (scheduler)", False, Phase.PENDING
    IMAGE_PULL_BACK_OFF = (
        "ImagePullBackOff",
        "the trainer image cannot be pulled (kubelet)",
        True,
        Phase.PENDING,
    )
    ERR_IMAGE_PULL = "ErrImagePull", "pulling the trainer image failed (kubelet)", True, Phase.PENDING
    INVALID_IMAGE_NAME = (
        "InvalidImageName",
        "spec.image is not a valid image reference (kubelet)",
        True,
        Phase.PENDING,
    )
    ERR_IMAGE_NEVER_PULL = (
        "ErrImageNeverPull",
        "imagePullPolicy Never and the image is not on the node (kubelet)",
        True,
        Phase.PENDING,
    )
    CREATE_CONTAINER_CONFIG_ERROR = (
        "CreateContainerConfigError",
        "a referenced Secret or key is missing (kubelet)",
        True,
        Phase.PENDING,
    )
    CREATE_CONTAINER_ERROR = (
        "CreateContainerError",
        "the container runtime cannot create the trainer",
        True,
        Phase.PENDING,
    )
    RUN_CONTAINER_ERROR = (
        "RunContainerError",
        "the container runtime cannot start the trainer",
        True,
        Phase.PENDING,
    )
    # -- Queued ----------------------------------------------------------------------------
    WAITING_FOR_ADMISSION = (
        "WaitingForAdmission",
        "waiting for Kueue to admit the job from its queue",
        False,
        Phase.QUEUED,
    )
    # -- Running ---------------------------------------------------------------------------
    TRAINING = "Training", "the trainer pod is running", False, Phase.RUNNING
    COMPLETING = (
        "Completing",
        "the trainer exited 0; the Job controller has not marked the Job complete yet",
        False,
        Phase.RUNNING,
    )
    # -- Suspended -------------------------------------------------------------------------
    SUSPENDING = "Suspending", "spec.suspend is true; the trainer pod is stopping", False, Phase.SUSPENDED
    SUSPENDED = "Suspended", "suspended by spec.suspend; checkpoints are kept", False, Phase.SUSPENDED
    # -- Succeeded -------------------------------------------------------------------------
    COMPLETED = "Completed", "training finished and the result is published", False, Phase.SUCCEEDED
    # -- Failed ----------------------------------------------------------------------------
    INVALID_DATASET = (
        "InvalidDataset",
        "bad records or unreadable input objects (trainer exit 42)",
        True,
        Phase.FAILED,
    )
    INVALID_CONFIG = (
        "InvalidConfig",
        "the config does not fit the hardware or the output prefix (trainer exit 43)",
        True,
        Phase.FAILED,
    )
    WORLD_SIZE_MISMATCH = (
        "WorldSizeMismatch",
        "the launcher started a different number of processes than GPUs requested (trainer exit 44)",
        True,
        Phase.FAILED,
    )
    OOM_KILLED = "OOMKilled", "the trainer ran out of memory (resources.memory)", True, Phase.FAILED
    DEADLINE_EXCEEDED = (
        "DeadlineExceeded",
        "the run passed lifecycle.activeDeadlineSeconds",
        True,
        Phase.FAILED,
    )
    BACKOFF_LIMIT_EXCEEDED = (
        "BackoffLimitExceeded",
        "more attempts failed than lifecycle.backoffLimit allows (Job controller)",
        True,
        Phase.FAILED,
    )
    POD_FAILURE_POLICY = (
        "PodFailurePolicy",
        "a podFailurePolicy rule failed the Job (Job controller)",
        True,
        Phase.FAILED,
    )
    EVICTED = "Evicted", "the node evicted the trainer pod (kubelet)", True, Phase.FAILED
    ERROR = (
        "Error",
        "the trainer exited with another code; the message holds its termination message",
        True,
        Phase.FAILED,
    )
    POD_FAILED = "PodFailed", "the trainer pod failed without an exit code", True, Phase.FAILED
    FAILED = "Failed", "the Job failed and no pod is left to say why", True, Phase.FAILED
    JOB_DELETED = "JobDeleted", "the trainer Job was deleted before it finished", True, Phase.FAILED
    INVALID_SPEC = (
        "InvalidSpec",
        "the stored spec does not parse with this operator's API types (stored under an older schema)",
        True,
        Phase.FAILED,
    )
    # -- conditions only -------------------------------------------------------------------
    JOB_CREATED = "JobCreated", "Created=True: the trainer Job exists", False
    NOT_RUNNING = "NotRunning", "Running=False: see the phase", False
    NOT_SUSPENDED = "NotSuspended", "Suspended=False: see the phase", False
    NOT_SUCCEEDED = "NotSucceeded", "Succeeded=False: see the phase", False
    NOT_FAILED = "NotFailed", "Failed=False: see the phase", False


#: The trainer's exit codes, as failure reasons.
EXIT_CODE_REASONS: Final = {
    ExitCode.INVALID_DATA: Reason.INVALID_DATASET,
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.WORLD_SIZE_MISMATCH: Reason.WORLD_SIZE_MISMATCH,
}


#: The values of the warning reasons.
WARNING_REASONS: Final = frozenset(reason.value for reason in Reason if reason.warning)


def is_warning(phase: str, reason: str) -> bool:
    """Whether a (phase, reason) pair calls for a human: every failure, and the listed warnings."""
    return phase == Phase.FAILED or reason in WARNING_REASONS
