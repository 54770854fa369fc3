"""``FineTuneJob.status``: what the operator (and, for ``progress``, the trainer) writes.

``progress`` belongs to the trainer, which patches it with its own token; every other field
belongs to the operator (:data:`OPERATOR_FIELDS`).
"""

from __future__ import annotations

import datetime
from typing import Final, Literal

from pydantic import Field

from .base import ApiModel
from .reasons import Phase

#: metav1.Condition's reason pattern: one rejected character fails the whole status patch.
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
#: Longest status.message (the trainer's termination message fits: Kubernetes caps it at 4096 too).
MAX_MESSAGE: Final = 4096


def rfc3339(moment: datetime.datetime | None = None) -> str:
    """RFC 3339 in UTC with second precision, as metav1.Time serializes (now by default)."""
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Progress(ApiModel):
    """Live training progress, patched by the trainer itself."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    epoch: float | None = None
    """Fractional epoch reached."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    learning_rate: float | None = None
    """Current learning rate."""
    tokens_per_second: float | None = None
    """Training throughput."""
    eta_seconds: float | None = None
    """Estimated seconds to the end of training."""
    reward_accuracy: float | None = None
    """objectives dpo, orpo and reward: share of the latest logged pairs whose chosen response the
    model rewards above the rejected one (0.5 is chance)."""
    reward_margin: float | None = None
    """objectives dpo, orpo, kto and reward: mean reward of the chosen (kto: desirable) minus the
    rejected (undesirable) responses."""
    reward_chosen: float | None = None
    """objectives dpo, orpo and kto: mean reward of the chosen (kto: desirable) responses; for dpo
    and kto beta times the log-probability ratio to the reference model."""
    reward_rejected: float | None = None
    """objectives dpo, orpo and kto: mean reward of the rejected (kto: undesirable) responses; it
    should fall."""
    eval_reward_accuracy: float | None = None
    """objectives dpo, orpo and reward: reward accuracy on the validation data at the latest
    evaluation."""
    eval_accuracy: float | None = None
    """task sequence-classification: accuracy on the validation data at the latest evaluation."""
    eval_f1: float | None = None
    """task sequence-classification: macro-averaged F1 on the validation data at the latest
    evaluation."""
    last_checkpoint: str | None = None
    """URI of the latest complete checkpoint in object storage."""
    update_time: datetime.datetime | None = None
    """When the trainer last reported."""


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(max_length=316)
    """Type of the condition."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition."""
    observed_generation: int | None = Field(default=None, ge=0, json_schema_extra={"format": "int64"})
    """The metadata.generation the condition was set for."""
    last_transition_time: datetime.datetime
    """When the status last changed."""
    reason: str = Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)
    """CamelCase reason for the last transition."""
    message: str = Field(max_length=32768)
    """Human-readable detail."""


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator (progress by the trainer)."""

    phase: Phase | None = None
    """Pending (created, pod not yet running), Queued (waiting for Kueue admission), Running,
    Suspended, Succeeded, Failed or Cancelled (stopped for good by spec.cancel)."""
    reason: str | None = Field(default=None, max_length=256)
    """Machine-readable reason for the phase, e.g. ImagePullBackOff, OOMKilled, DeadlineExceeded,
    InvalidDataset, BackoffLimitExceeded."""
    message: str | None = Field(default=None, max_length=MAX_MESSAGE)
    """Human-readable detail, e.g. the trainer's termination message."""
    observed_generation: int | None = Field(default=None, json_schema_extra={"format": "int64"})
    """The metadata.generation this status reflects."""
    job_name: str | None = None
    """Name of the batch/v1 Job running the trainer."""
    start_time: datetime.datetime | None = None
    """When the trainer first started."""
    completion_time: datetime.datetime | None = None
    """When the run succeeded, failed or was cancelled."""
    attempts: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Trainer pods started so far (retries included)."""
    exit_code: int | None = Field(default=None, json_schema_extra={"format": "int32"})
    """Exit code of the trainer container in the latest finished attempt."""
    output_uri: str | None = Field(default=None, alias="outputURI")
    """Object-storage URI of the result (spec.output.uri)."""
    progress_summary: str | None = None
    """Steps done out of the total (step/totalSteps), for kubectl get."""
    progress: Progress | None = None
    """Live training progress, patched by the trainer itself."""
    conditions: tuple[Condition, ...] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Latest observations: Created, Running, Suspended, Succeeded, Failed and Cancelled, each True
    or False with a reason."""


def _wire_name(field: str) -> str:
    info = FineTuneJobStatus.model_fields[field]
    return info.alias or field


#: Status keys the operator owns; ``progress`` is the trainer's and never part of its patches.
OPERATOR_FIELDS: Final = tuple(
    _wire_name(name) for name in FineTuneJobStatus.model_fields if name != "progress"
)
