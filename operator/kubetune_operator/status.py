"""Pure status computation: (FineTuneJob, its Job, the Job's Pods) -> the operator's status fields.

Level-based: the result depends only on the objects' current state (plus the previous status for
the few facts that outlive the Job, such as a recorded outcome after the Job's TTL deleted it),
never on which events arrived. ``status.progress`` belongs to the trainer and is never touched.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubetune_trainer.config import EXIT_INVALID_CONFIG, EXIT_INVALID_DATA, EXIT_WORLD_SIZE_MISMATCH

from . import names

Obj = dict[str, Any]
Body = Mapping[str, Any]

PENDING: Final = "Pending"
QUEUED: Final = "Queued"
RUNNING: Final = "Running"
SUSPENDED: Final = "Suspended"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
PHASES: Final = (PENDING, QUEUED, RUNNING, SUSPENDED, SUCCEEDED, FAILED)
TERMINAL_PHASES: Final = frozenset({SUCCEEDED, FAILED})

#: Condition types, in the order they appear in status.conditions.
CONDITION_TYPES: Final = ("Created", "Running", "Suspended", "Succeeded", "Failed")

#: Status keys the operator owns; everything else (``progress``) is left alone.
OWNED_KEYS: Final = (
    "phase",
    "reason",
    "message",
    "observedGeneration",
    "jobName",
    "startTime",
    "completionTime",
    "attempts",
    "exitCode",
    "outputURI",
    "progressSummary",
    "conditions",
)

#: The trainer's exit codes, as failure reasons.
EXIT_CODE_REASONS: Final = {
    EXIT_INVALID_DATA: "InvalidDataset",
    EXIT_INVALID_CONFIG: "InvalidConfig",
    EXIT_WORLD_SIZE_MISMATCH: "WorldSizeMismatch",
}
#: Container waiting reasons worth surfacing while the pod is pending.
WAITING_REASONS: Final = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
MAX_MESSAGE: Final = 4096


@dataclass(frozen=True)
class Verdict:
    """The phase with its reason and human message."""

    phase: str
    reason: str
    message: str


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as metav1.Time serializes."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _job_condition(job: Body, *types: str) -> Mapping[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") in types and cond.get("status") == "True":
            found: Mapping[str, Any] = cond
            return found
    return None


def _trainer_status(pod: Body) -> Mapping[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == names.TRAINER_CONTAINER:
            found: Mapping[str, Any] = status
            return found
    return None


def _terminated(pod: Body) -> Mapping[str, Any] | None:
    status = _trainer_status(pod)
    if status is None:
        return None
    terminated: Mapping[str, Any] | None = status.get("state", {}).get("terminated")
    return terminated


def _by_age(pods: Sequence[Body]) -> list[Body]:
    return sorted(pods, key=lambda pod: pod.get("metadata", {}).get("creationTimestamp") or "")


def _latest_failed(pods: Sequence[Body]) -> Body | None:
    failed = [pod for pod in pods if pod.get("status", {}).get("phase") == "Failed"]
    return _by_age(failed)[-1] if failed else None


def _latest_terminated(pods: Sequence[Body]) -> Body | None:
    done = [pod for pod in pods if _terminated(pod) is not None]
    return _by_age(done)[-1] if done else None


def pod_failure(pod: Body) -> tuple[str, str]:
    """Why one trainer pod failed: (reason, message), from its container state or the pod."""
    terminated = _terminated(pod) or {}
    exit_code = terminated.get("exitCode")
    detail = (terminated.get("message") or "").strip()
    if terminated.get("reason") == "OOMKilled":
        return "OOMKilled", detail or "the trainer ran out of memory (OOMKilled)"
    if exit_code in EXIT_CODE_REASONS:
        return EXIT_CODE_REASONS[exit_code], detail or f"the trainer exited with code {exit_code}"
    pod_status = pod.get("status", {})
    if pod_status.get("reason"):
        return str(pod_status["reason"]), str(pod_status.get("message") or pod_status["reason"])
    if exit_code is not None:
        text = f"the trainer exited with code {exit_code}"
        return "Error", f"{text}: {detail}" if detail else text
    return "PodFailed", "the trainer pod failed"


def _failed_verdict(job: Body, pods: Sequence[Body]) -> Verdict:
    cond = _job_condition(job, "Failed", "FailureTarget") or {}
    job_reason = str(cond.get("reason") or "Failed")
    job_message = str(cond.get("message") or "")
    if job_reason == "DeadlineExceeded":
        return Verdict(FAILED, "DeadlineExceeded", job_message or "the job ran past activeDeadlineSeconds")
    pod = _latest_failed(pods)
    if pod is None:
        return Verdict(FAILED, job_reason, job_message or "the trainer job failed")
    reason, message = pod_failure(pod)
    if job_reason == "BackoffLimitExceeded":
        message = f"{message} (backoff limit reached)"
    return Verdict(FAILED, reason, message)


def _pending_verdict(pods: Sequence[Body]) -> Verdict:
    live = [pod for pod in pods if pod.get("status", {}).get("phase") in (None, "Pending")]
    for pod in reversed(_by_age(live)):
        status = _trainer_status(pod)
        waiting = (status or {}).get("state", {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_REASONS:
            return Verdict(PENDING, str(waiting["reason"]), str(waiting.get("message") or waiting["reason"]))
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = str(cond.get("reason") or "Unschedulable")
                return Verdict(
                    PENDING, reason, str(cond.get("message") or "the trainer pod cannot be scheduled")
                )
        return Verdict(PENDING, "PodStarting", "the trainer pod is starting")
    return Verdict(PENDING, "WaitingForPod", "waiting for the Job to create the trainer pod")


def verdict(ftj: Body, job: Body | None, pods: Sequence[Body], blocked: Sequence[str] = ()) -> Verdict:
    """The phase, from the Job's conditions and the Pods' states.

    The previous status matters only once the Job is gone (e.g. deleted by its TTL).
    """
    spec = ftj.get("spec", {})
    previous = ftj.get("status") or {}
    if job is None:
        if previous.get("phase") in TERMINAL_PHASES:
            return Verdict(previous["phase"], previous.get("reason", ""), previous.get("message", ""))
        if _condition_true(previous, "Created"):
            return Verdict(FAILED, "JobDeleted", "the trainer Job was deleted before it finished")
        if blocked:
            held = ", ".join(blocked)
            return Verdict(PENDING, "WaitingForCleanup", f"names held by objects of another owner: {held}")
        return Verdict(PENDING, "Creating", "creating the trainer Job")
    if _job_condition(job, "Complete", "SuccessCriteriaMet"):
        pod = _latest_terminated([p for p in pods if p.get("status", {}).get("phase") == "Succeeded"])
        summary = ((pod and _terminated(pod)) or {}).get("message") or ""
        return Verdict(SUCCEEDED, "Completed", summary.strip() or "training completed")
    if _job_condition(job, "Failed", "FailureTarget"):
        return _failed_verdict(job, pods)
    job_status = job.get("status", {})
    if job.get("spec", {}).get("suspend"):
        if spec.get("suspend"):
            if job_status.get("active"):
                return Verdict(SUSPENDED, "Suspending", "stopping the trainer pod; checkpoints are kept")
            return Verdict(SUSPENDED, "Suspended", "suspended by spec.suspend; checkpoints are kept")
        queue = spec.get("scheduling", {}).get("queueName")
        if queue:
            return Verdict(
                QUEUED, "WaitingForAdmission", f"waiting for Kueue to admit the job from queue {queue}"
            )
        return Verdict(PENDING, "Resuming", "resuming the trainer Job")
    running = [
        pod
        for pod in pods
        if pod.get("status", {}).get("phase") == "Running"
        and not pod.get("metadata", {}).get("deletionTimestamp")
    ]
    attempt = max(1, _attempts(job))
    if running:
        message = f"training (attempt {attempt})"
        failed = _latest_failed(pods)
        if failed is not None:
            message += f"; the previous attempt failed: {pod_failure(failed)[0]}"
        return Verdict(RUNNING, "Training", message)
    finished = [
        pod
        for pod in pods
        if pod.get("status", {}).get("phase") == "Succeeded"
        and not pod.get("metadata", {}).get("deletionTimestamp")
    ]
    if finished:
        # The trainer exited 0 but the Job controller has not marked the Job complete yet:
        # still Running, so the phase never steps back to Pending on the way to Succeeded.
        return Verdict(RUNNING, "Completing", "the trainer finished; waiting for the Job to complete")
    pending = _pending_verdict(pods)
    failed = _latest_failed(pods)
    if pending.reason == "WaitingForPod" and failed is not None:
        reason, detail = pod_failure(failed)
        message = f"attempt {attempt} failed ({reason}: {detail}); waiting to retry"
        return Verdict(PENDING, "Retrying", message)
    return pending


def _attempts(job: Body) -> int:
    status = job.get("status", {})
    return int(status.get("failed") or 0) + int(status.get("succeeded") or 0) + int(status.get("active") or 0)


def _condition_true(status: Mapping[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def progress_summary(progress: Mapping[str, Any] | None) -> str | None:
    """``step/totalSteps`` from the trainer's progress, for the Progress printer column."""
    if not progress or progress.get("step") is None:
        return None
    total = progress.get("totalSteps")
    return f"{progress['step']}/{total}" if total else str(progress["step"])


_CONDITION_REASON_CHARS = re.compile(r"[^A-Za-z0-9_,:]")


def condition_reason(reason: str, fallback: str) -> str:
    """A reason the API server accepts (metav1.Condition: ``^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$``).

    Pod reasons are copied from the kubelet and may not fit (``OutOfnvidia.com/gpu``); one
    rejected character would make every status patch fail with 422.
    """
    cleaned = _CONDITION_REASON_CHARS.sub("_", reason).strip("_,:")
    if not cleaned or not cleaned[0].isalpha():
        return fallback
    return cleaned[:1024]


def conditions(
    previous: Sequence[Mapping[str, Any]],
    verdict_: Verdict,
    created: bool,
    generation: int,
    now: datetime.datetime,
) -> list[Obj]:
    """metav1.Conditions for the verdict; lastTransitionTime moves only when a status flips."""
    phase = verdict_.phase
    wanted: dict[str, tuple[bool, str, str]] = {
        "Created": (created, "JobCreated", "the trainer Job exists")
        if created
        else (False, verdict_.reason or "Creating", "the trainer Job does not exist yet"),
        "Running": (phase == RUNNING, verdict_.reason, verdict_.message),
        "Suspended": (phase in (SUSPENDED, QUEUED), verdict_.reason, verdict_.message),
        "Succeeded": (phase == SUCCEEDED, verdict_.reason, verdict_.message),
        "Failed": (phase == FAILED, verdict_.reason, verdict_.message),
    }
    old = {c.get("type"): c for c in previous}
    result: list[Obj] = []
    for kind in CONDITION_TYPES:
        is_true, reason, message = wanted[kind]
        status = "True" if is_true else "False"
        if not is_true and kind != "Created":
            reason, message = (
                f"Not{kind}" if kind != "Running" else _not_running_reason(phase),
                f"phase is {phase}",
            )
        before = old.get(kind)
        changed = before is None or before.get("status") != status
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": condition_reason(reason, kind),
                "message": _truncate(message),
                "observedGeneration": generation,
                "lastTransitionTime": timestamp(now) if changed else (before or {}).get("lastTransitionTime"),
            }
        )
    return result


def _not_running_reason(phase: str) -> str:
    return {
        PENDING: "Pending",
        QUEUED: "Queued",
        SUSPENDED: "Suspended",
        SUCCEEDED: "Finished",
        FAILED: "Finished",
    }.get(phase, "NotRunning")


def compute(
    ftj: Body, job: Body | None, pods: Sequence[Body], now: datetime.datetime, blocked: Sequence[str] = ()
) -> Obj:
    """The operator-owned status fields (see :data:`OWNED_KEYS`); absent keys mean "unset".

    ``blocked`` names children whose names are still held by another owner's objects.
    """
    spec = ftj.get("spec", {})
    meta = ftj.get("metadata", {})
    previous: Mapping[str, Any] = ftj.get("status") or {}
    result = verdict(ftj, job, pods, blocked)
    generation = int(meta.get("generation") or 0)
    job_gone_after_end = job is None and previous.get("phase") in TERMINAL_PHASES
    created = job is not None or job_gone_after_end or _condition_true(previous, "Created")

    status: Obj = {
        "phase": result.phase,
        "reason": result.reason,
        "message": _truncate(result.message),
        "observedGeneration": generation,
        "jobName": names.job_name(meta.get("name", "")),
        "outputURI": spec.get("output", {}).get("uri"),
        "conditions": conditions(previous.get("conditions") or [], result, created, generation, now),
    }
    summary = progress_summary(previous.get("progress"))
    if summary is not None:
        status["progressSummary"] = summary

    if job_gone_after_end:
        # The Job's TTL removed it: keep what was recorded when it ended.
        for key in ("startTime", "completionTime", "attempts", "exitCode"):
            if key in previous:
                status[key] = previous[key]
        return {key: value for key, value in status.items() if value is not None}

    job_status = (job or {}).get("status", {})
    start = previous.get("startTime") or job_status.get("startTime")
    if start:
        status["startTime"] = start
    if job is not None:
        attempts = max(int(previous.get("attempts") or 0), _attempts(job))
        if attempts:
            status["attempts"] = attempts
    if result.phase == SUCCEEDED:
        status["completionTime"] = job_status.get("completionTime") or timestamp(now)
    elif result.phase == FAILED:
        cond = _job_condition(job or {}, "Failed", "FailureTarget") or {}
        status["completionTime"] = (
            previous.get("completionTime") or cond.get("lastTransitionTime") or timestamp(now)
        )
    last = _latest_terminated(pods)
    if last is not None:
        status["exitCode"] = (_terminated(last) or {}).get("exitCode")
    elif "exitCode" in previous:
        status["exitCode"] = previous["exitCode"]
    return {key: value for key, value in status.items() if value is not None}


def patch(previous: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Obj | None:
    """A JSON merge patch of ``status`` turning the owned keys of ``previous`` into ``desired``.

    ``None`` when nothing changed (so no write happens). Keys the operator does not own
    (the trainer's ``progress``) are never part of the patch.
    """
    previous = previous or {}
    changes: Obj = {}
    for key in OWNED_KEYS:
        if key in desired:
            if previous.get(key) != desired[key]:
                changes[key] = desired[key]
        elif key in previous:
            changes[key] = None
    return changes or None
