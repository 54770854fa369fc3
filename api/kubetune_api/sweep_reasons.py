"""Phases, trial states, condition types and every reason a FineTuneSweep's status or Events carry.

The FineTuneSweep's own vocabulary, kept apart from the FineTuneJob's (:mod:`kubetune_api.reasons`)
so that neither table grows words the other never uses; docs/api.md lists both.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class SweepPhase(StrEnum):
    """``status.phase`` of a FineTuneSweep."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL_SWEEP_PHASES: Final = frozenset({SweepPhase.SUCCEEDED, SweepPhase.FAILED})

SWEEP_PHASE_MEANINGS: Final = {
    SweepPhase.RUNNING: "trials are being created or are running",
    SweepPhase.SUCCEEDED: (
        "every trial has ended and at least one reported the objective; bestTrial names the best"
    ),
    SweepPhase.FAILED: (
        "no trial reported the objective, or the search space cannot be applied to the template"
    ),
}


class TrialState(StrEnum):
    """``status.trials[].state``: what became of one trial's FineTuneJob."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    PRUNED = "Pruned"


FINISHED_TRIAL_STATES: Final = frozenset({TrialState.SUCCEEDED, TrialState.FAILED, TrialState.PRUNED})

TRIAL_STATE_MEANINGS: Final = {
    TrialState.RUNNING: "its FineTuneJob has not ended (Pending, Queued, Running or Suspended)",
    TrialState.SUCCEEDED: "its FineTuneJob succeeded and reported the objective metric (value)",
    TrialState.FAILED: (
        "its FineTuneJob failed, was cancelled by a user or deleted, or succeeded without reporting"
        " the objective metric (message says which)"
    ),
    TrialState.PRUNED: "the pruner stopped it early (its FineTuneJob got spec.cancel: true)",
}


class SweepConditionType(StrEnum):
    """``status.conditions[].type`` of a FineTuneSweep, in the order they appear."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class SweepReason(StrEnum):
    """A FineTuneSweep reason: its value, a one-line meaning, and whether it is a warning."""

    meaning: str
    warning: bool

    def __new__(cls, value: str, meaning: str, warning: bool) -> SweepReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.warning = warning
        return member

    # -- status.reason --------------------------------------------------------------------------
    TRIALS_RUNNING = "TrialsRunning", "trials are running; more are created as maxParallel allows", False
    COMPLETED = "Completed", "every trial has ended; bestTrial, bestValue and bestParameters are set", False
    ALL_TRIALS_FAILED = "AllTrialsFailed", "every trial ended without reporting the objective metric", True
    INVALID_SEARCH_SPACE = (
        "InvalidSearchSpace",
        "a value of the search space makes the template an invalid FineTuneJob spec; no trial is created",
        True,
    )
    TRIAL_REFUSED = (
        "TrialRefused",
        "the API server refused a trial's FineTuneJob (a quota, an admission policy); retried",
        True,
    )
    # -- Events only ----------------------------------------------------------------------------
    TRIAL_CREATED = "TrialCreated", "a trial's FineTuneJob was created with the parameters named", False
    TRIAL_PRUNED = "TrialPruned", "the pruner stopped a trial: its FineTuneJob got spec.cancel: true", False
    TRIAL_ENDED = "TrialEnded", "a trial's FineTuneJob ended; its value (or why none) is in status", False
