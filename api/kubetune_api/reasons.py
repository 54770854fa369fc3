"""Phases, condition types and every reason a FineTuneJob's status or Events carry.

One enum member per reason, with what it means and whether it is a warning (a Warning Event,
Degraded in Argo CD). Reasons that kubetune passes on from the kubelet, the scheduler or the Job
controller are listed too, so the docs' table and the Argo CD health check know them; a reason
from those components that is not listed still reaches status unchanged.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from .exitcodes import ExitCode


class Phase(StrEnum):
    """``status.phase``: one word for humans and the printer column."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


#: Phases a run never leaves.
TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


PHASE_MEANINGS: Final = {
    Phase.PENDING: "created; the trainer pod is not running yet (or is being retried)",
    Phase.QUEUED: "waiting for Kueue to admit the job",
    Phase.RUNNING: "the trainer is running",
    Phase.SUSPENDED: "stopped by spec.suspend; checkpoints are kept",
    Phase.SUCCEEDED: "the result and its manifest are in object storage",
    Phase.FAILED: "the run ended without a result; reason says why",
    Phase.CANCELLED: (
        "stopped for good by spec.cancel; the FineTuneJob, its status and its checkpoints are kept,"
        " the trainer Job is deleted; never resumed"
    ),
}


class ConditionType(StrEnum):
    """``status.conditions[].type``, in the order they appear."""

    CREATED = "Created"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


#: Who sets a reason: kubetune itself, or a Kubernetes component whose reason kubetune passes on.
Source = Literal["kubetune", "kubelet", "scheduler", "Job controller"]

P, Q, R, S, OK, F, C = (
    Phase.PENDING,
    Phase.QUEUED,
    Phase.RUNNING,
    Phase.SUSPENDED,
    Phase.SUCCEEDED,
    Phase.FAILED,
    Phase.CANCELLED,
)


class Reason(StrEnum):
    """A reason: its value, a one-line meaning, whether it is a warning, who sets it, its phases.

    ``phases`` is empty for condition-only reasons (the reason of a False condition).
    """

    meaning: str
    warning: bool
    source: Source
    phases: tuple[Phase, ...]

    def __new__(cls, value: str, meaning: str, warning: bool, source: Source, *phases: Phase) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.warning = warning
        member.source = source
        member.phases = phases
        return member

    # -- Pending ---------------------------------------------------------------------------
    CREATING = (
        "Creating",
        "creating the trainer Job and its ConfigMap, ServiceAccount and Role",
        False,
        "kubetune",
        P,
    )
    WAITING_FOR_CLEANUP = (
        "WaitingForCleanup",
        "a same-named object of another owner (kubectl replace --force) still holds a child's name",
        False,
        "kubetune",
        P,
    )
    WAITING_FOR_POD = (
        "WaitingForPod",
        "waiting for the Job controller to create the trainer pod",
        False,
        "kubetune",
        P,
    )
    POD_STARTING = "PodStarting", "the trainer pod is scheduled and starting", False, "kubetune", P
    RETRYING = "Retrying", "an attempt failed; the Job will start another pod", False, "kubetune", P
    RESUMING = "Resuming", "spec.suspend turned false; the Job is starting a new pod", False, "kubetune", P
    INVALID_SPEC = (
        "InvalidSpec",
        "the stored spec does not parse with this operator's API types (older than its CRD?); retried",
        True,
        "kubetune",
        P,
    )
    CREATE_REFUSED = (
        "CreateRefused",
        "the API server refused a child (an invalid field, a quota, an admission policy); retried",
        True,
        "kubetune",
        P,
    )
    SERVICE_ACCOUNT_MISSING = (
        "ServiceAccountMissing",
        "identity.serviceAccountName names no ServiceAccount in the namespace; retried",
        True,
        "kubetune",
        P,
    )
    UNSCHEDULABLE = "Unschedulable", "no node fits the trainer pod yet", False, "scheduler", P
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff", "the trainer image cannot be pulled", True, "kubelet", P
    ERR_IMAGE_PULL = "ErrImagePull", "pulling the trainer image failed", True, "kubelet", P
    INVALID_IMAGE_NAME = "InvalidImageName", "spec.image is not a valid image reference", True, "kubelet", P
    ERR_IMAGE_NEVER_PULL = (
        "ErrImageNeverPull",
        "imagePullPolicy Never and the image is not on the node",
        True,
        "kubelet",
        P,
    )
    CREATE_CONTAINER_CONFIG_ERROR = (
        "CreateContainerConfigError",
        "a referenced Secret or key is missing",
        True,
        "kubelet",
        P,
    )
    CREATE_CONTAINER_ERROR = (
        "CreateContainerError",
        "the container runtime cannot create the trainer",
        True,
        "kubelet",
        P,
    )
    RUN_CONTAINER_ERROR = (
        "RunContainerError",
        "the container runtime cannot start the trainer",
        True,
        "kubelet",
        P,
    )
    # -- Queued ----------------------------------------------------------------------------
    WAITING_FOR_ADMISSION = (
        "WaitingForAdmission",
        "waiting for Kueue to admit the job from its queue",
        False,
        "kubetune",
        Q,
    )
    # -- Running ---------------------------------------------------------------------------
    TRAINING = "Training", "the trainer pod is running", False, "kubetune", R
    COMPLETING = (
        "Completing",
        "the trainer exited 0; the Job controller has not marked the Job complete yet",
        False,
        "kubetune",
        R,
    )
    # -- Suspended -------------------------------------------------------------------------
    SUSPENDING = "Suspending", "spec.suspend is true; the trainer pod is stopping", False, "kubetune", S
    SUSPENDED = "Suspended", "suspended by spec.suspend; checkpoints are kept", False, "kubetune", S
    # -- Succeeded -------------------------------------------------------------------------
    COMPLETED = "Completed", "training finished and the result is published", False, "kubetune", OK
    # -- Failed ----------------------------------------------------------------------------
    INVALID_DATASET = (
        "InvalidDataset",
        "bad records or unreadable input objects (trainer exit 42)",
        True,
        "kubetune",
        F,
    )
    INVALID_CONFIG = (
        "InvalidConfig",
        "the config does not fit the hardware or the output prefix (trainer exit 43)",
        True,
        "kubetune",
        F,
    )
    WORLD_SIZE_MISMATCH = (
        "WorldSizeMismatch",
        "the launcher started a different number of processes than GPUs requested (trainer exit 44)",
        True,
        "kubetune",
        F,
    )
    SCRATCH_TOO_SMALL = (
        "ScratchTooSmall",
        "the model and data do not fit the scratch disk; raise resources.scratch (trainer exit 45)",
        True,
        "kubetune",
        F,
    )
    OUTPUT_NOT_WRITABLE = (
        "OutputNotWritable",
        "a probe write to output.uri failed before training: no bucket, or no access (trainer exit 46)",
        True,
        "kubetune",
        F,
    )
    SECRET_MISSING = (
        "SecretMissing",
        "a Secret or key named by storage.credentialsSecretRef or model.tokenSecretRef is gone (exit 47)",
        True,
        "kubetune",
        F,
    )
    STORAGE_UNREACHABLE = (
        "StorageUnreachable",
        "the object store did not answer at storage.endpoint; retried per backoffLimit (trainer exit 48)",
        True,
        "kubetune",
        F,
    )
    OOM_KILLED = "OOMKilled", "the trainer ran out of memory (resources.memory)", True, "kubelet", F
    DEADLINE_EXCEEDED = (
        "DeadlineExceeded",
        "the run passed lifecycle.activeDeadlineSeconds",
        True,
        "Job controller",
        F,
    )
    BACKOFF_LIMIT_EXCEEDED = (
        "BackoffLimitExceeded",
        "more attempts failed than lifecycle.backoffLimit allows",
        True,
        "Job controller",
        F,
    )
    POD_FAILURE_POLICY = (
        "PodFailurePolicy",
        "a podFailurePolicy rule failed the Job",
        True,
        "Job controller",
        F,
    )
    EVICTED = "Evicted", "the node evicted the trainer pod", True, "kubelet", F
    ERROR = (
        "Error",
        "the trainer exited with another code; the message holds its termination message",
        True,
        "kubetune",
        F,
    )
    POD_FAILED = "PodFailed", "the trainer pod failed without an exit code", True, "kubetune", F
    FAILED = "Failed", "the Job failed and no pod is left to say why", True, "kubetune", F
    JOB_DELETED = "JobDeleted", "the trainer Job was deleted before it finished", True, "kubetune", F
    # -- Cancelled -------------------------------------------------------------------------
    CANCELLING = (
        "Cancelling",
        "spec.cancel is true; the trainer Job is being deleted, its pod stops (saving a checkpoint)",
        False,
        "kubetune",
        C,
    )
    CANCELLED = (
        "Cancelled",
        "cancelled by spec.cancel: the trainer Job is gone, status and checkpoints are kept; never resumed",
        False,
        "kubetune",
        C,
    )
    # -- conditions only -------------------------------------------------------------------
    JOB_CREATED = "JobCreated", "Created=True: the trainer Job exists", False, "kubetune"
    NOT_STARTED = (
        "Pending",
        "Running=False: the trainer has not started (or is being retried)",
        False,
        "kubetune",
    )
    IN_QUEUE = "Queued", "Running=False: waiting for Kueue", False, "kubetune"
    FINISHED = "Finished", "Running=False: the run has ended", False, "kubetune"
    NOT_SUSPENDED = "NotSuspended", "Suspended=False: see the phase", False, "kubetune"
    NOT_SUCCEEDED = "NotSucceeded", "Succeeded=False: see the phase", False, "kubetune"
    NOT_FAILED = "NotFailed", "Failed=False: see the phase", False, "kubetune"
    NOT_CANCELLED = (
        "NotCancelled",
        "Cancelled=False: see the phase (also when spec.cancel came after the run had ended)",
        False,
        "kubetune",
    )


del P, Q, R, S, OK, F, C

#: The trainer's exit codes, as failure reasons.
EXIT_CODE_REASONS: Final = {
    ExitCode.INVALID_DATA: Reason.INVALID_DATASET,
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.WORLD_SIZE_MISMATCH: Reason.WORLD_SIZE_MISMATCH,
    ExitCode.SCRATCH_TOO_SMALL: Reason.SCRATCH_TOO_SMALL,
    ExitCode.OUTPUT_NOT_WRITABLE: Reason.OUTPUT_NOT_WRITABLE,
    ExitCode.SECRET_MISSING: Reason.SECRET_MISSING,
    ExitCode.STORAGE_UNREACHABLE: Reason.STORAGE_UNREACHABLE,
}


#: The values of the warning reasons.
WARNING_REASONS: Final = frozenset(reason.value for reason in Reason if reason.warning)


def is_warning(phase: str, reason: str) -> bool:
    """Whether a (phase, reason) pair calls for a human: every failure, and the listed warnings."""
    return phase == Phase.FAILED or reason in WARNING_REASONS
