"""Pure status computation: (FineTuneJob, its Job, the Job's Pods) -> the operator's status fields.

Level-based: the result depends only on the objects' current state (plus the previous status for
the few facts that outlive the Job, such as a recorded outcome after the Job's TTL deleted it),
never on which events arrived. ``status.progress`` belongs to the trainer and is never touched.
Every phase, condition type and reason comes from ``kubetune_api.reasons``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubetune_api.exitcodes import TERMINATED_EXIT_CODE
from kubetune_api.reasons import EXIT_CODE_REASONS, TERMINAL_PHASES, ConditionType, Phase, Reason
from kubetune_api.status import MAX_MESSAGE, OPERATOR_FIELDS, rfc3339

from . import names

Obj = dict[str, Any]
Body = Mapping[str, Any]

#: Container waiting reasons worth surfacing while the pod is pending: the kubelet's warnings.
WAITING_REASONS: Final = frozenset(
    reason
    for reason in Reason
    if reason.source == "kubelet" and reason.warning and Phase.PENDING in reason.phases
)


@dataclass(frozen=True)
class Hold:
    """Why the operator could not create the children this time (the spec, or the API server's refusal)."""

    reason: Reason
    message: str


@dataclass(frozen=True)
class Verdict:
    """The phase with its reason and human message (``reason`` may be a kubelet's, passed on)."""

    phase: Phase
    reason: str
    message: str


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


def _in_phase(pods: Sequence[Body], phase: str) -> list[Body]:
    """Pods in a pod phase that are not being deleted."""
    return [
        pod
        for pod in pods
        if pod.get("status", {}).get("phase") == phase
        and not pod.get("metadata", {}).get("deletionTimestamp")
    ]


def _latest_failed(pods: Sequence[Body]) -> Body | None:
    failed = [pod for pod in pods if pod.get("status", {}).get("phase") == "Failed"]
    return _by_age(failed)[-1] if failed else None


def _latest_terminated(pods: Sequence[Body]) -> Body | None:
    done = [pod for pod in pods if _terminated(pod) is not None]
    return _by_age(done)[-1] if done else None


#: How the status says that a stopped pod does not count (the Job's podFailurePolicy ignores it).
NOT_COUNTED = "not counted against lifecycle.backoffLimit"


def pod_failure(pod: Body) -> tuple[str, str]:
    """Why one trainer pod failed: (reason, message), from its container state or the pod."""
    terminated = _terminated(pod) or {}
    exit_code = terminated.get("exitCode")
    detail = (terminated.get("message") or "").strip()
    disruption = next(
        (
            c
            for c in pod.get("status", {}).get("conditions") or []
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        ),
        None,
    )
    if disruption is not None:  # drained, preempted, evicted: its log tail would say nothing useful
        why = str(disruption.get("message") or disruption.get("reason") or "disrupted")
        return Reason.EVICTED, f"{why} ({disruption.get('reason', 'DisruptionTarget')}; {NOT_COUNTED})"
    if exit_code == TERMINATED_EXIT_CODE:
        return Reason.ERROR, f"stopped by SIGTERM after saving its checkpoint (pod deleted?); {NOT_COUNTED}"
    if terminated.get("reason") == Reason.OOM_KILLED:
        return Reason.OOM_KILLED, detail or "the trainer ran out of memory (OOMKilled)"
    if exit_code in EXIT_CODE_REASONS:
        return EXIT_CODE_REASONS[exit_code], detail or f"the trainer exited with code {exit_code}"
    pod_status = pod.get("status", {})
    if pod_status.get("reason"):
        return str(pod_status["reason"]), str(pod_status.get("message") or pod_status["reason"])
    if exit_code is not None:
        text = f"the trainer exited with code {exit_code}"
        return Reason.ERROR, f"{text}: {detail}" if detail else text
    return Reason.POD_FAILED, "the trainer pod failed"


def _failed_verdict(job: Body, pods: Sequence[Body]) -> Verdict:
    cond = _job_condition(job, "Failed", "FailureTarget") or {}
    job_reason = str(cond.get("reason") or Reason.FAILED)
    job_message = str(cond.get("message") or "")
    if job_reason == Reason.DEADLINE_EXCEEDED:
        return Verdict(
            Phase.FAILED, Reason.DEADLINE_EXCEEDED, job_message or "the job ran past activeDeadlineSeconds"
        )
    pod = _latest_failed(pods)
    if pod is None:
        return Verdict(Phase.FAILED, job_reason, job_message or "the trainer job failed")
    reason, message = pod_failure(pod)
    if job_reason == Reason.BACKOFF_LIMIT_EXCEEDED:
        message = f"{message} (backoff limit reached)"
    return Verdict(Phase.FAILED, reason, message)


def _pending_verdict(pods: Sequence[Body]) -> Verdict:
    live = [pod for pod in pods if pod.get("status", {}).get("phase") in (None, "Pending")]
    for pod in reversed(_by_age(live)):
        status = _trainer_status(pod)
        waiting = (status or {}).get("state", {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_REASONS:
            reason = str(waiting["reason"])
            return Verdict(Phase.PENDING, reason, str(waiting.get("message") or reason))
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = str(cond.get("reason") or Reason.UNSCHEDULABLE)
                message = str(cond.get("message") or "the trainer pod cannot be scheduled")
                return Verdict(Phase.PENDING, reason, message)
        return Verdict(Phase.PENDING, Reason.POD_STARTING, "the trainer pod is starting")
    return Verdict(Phase.PENDING, Reason.WAITING_FOR_POD, "waiting for the Job to create the trainer pod")


def _verdict_without_job(previous: Mapping[str, Any], blocked: Sequence[str]) -> Verdict:
    """No Job: a recorded outcome (the Job's TTL removed it), a lost Job, or one yet to create."""
    if previous.get("phase") in TERMINAL_PHASES:
        return Verdict(Phase(previous["phase"]), previous.get("reason", ""), previous.get("message", ""))
    if _condition_true(previous, ConditionType.CREATED):
        return Verdict(Phase.FAILED, Reason.JOB_DELETED, "the trainer Job was deleted before it finished")
    if blocked:
        held = ", ".join(blocked)
        return Verdict(
            Phase.PENDING, Reason.WAITING_FOR_CLEANUP, f"names held by objects of another owner: {held}"
        )
    return Verdict(Phase.PENDING, Reason.CREATING, "creating the trainer Job")


def _suspended_job_verdict(spec: Mapping[str, Any], job: Body) -> Verdict:
    """The Job is suspended: by the user, by Kueue until admission, or on its way back."""
    if spec.get("suspend"):
        if job.get("status", {}).get("active"):
            return Verdict(
                Phase.SUSPENDED, Reason.SUSPENDING, "stopping the trainer pod; checkpoints are kept"
            )
        return Verdict(Phase.SUSPENDED, Reason.SUSPENDED, "suspended by spec.suspend; checkpoints are kept")
    queue = spec.get("scheduling", {}).get("queueName")
    if queue:
        message = f"waiting for Kueue to admit the job from queue {queue}"
        return Verdict(Phase.QUEUED, Reason.WAITING_FOR_ADMISSION, message)
    return Verdict(Phase.PENDING, Reason.RESUMING, "resuming the trainer Job")


def _active_job_verdict(job: Body, pods: Sequence[Body]) -> Verdict:
    """The Job runs (unsuspended, not finished): from its pods' states."""
    attempt = max(1, _attempts(job))
    failed = _latest_failed(pods)
    if _in_phase(pods, "Running"):
        message = f"training (attempt {attempt})"
        if failed is not None:
            message += f"; the previous attempt failed: {pod_failure(failed)[0]}"
        return Verdict(Phase.RUNNING, Reason.TRAINING, message)
    if _in_phase(pods, "Succeeded"):
        # The trainer exited 0 but the Job controller has not marked the Job complete yet:
        # still Running, so the phase never steps back to Pending on the way to Succeeded.
        return Verdict(
            Phase.RUNNING, Reason.COMPLETING, "the trainer finished; waiting for the Job to complete"
        )
    pending = _pending_verdict(pods)
    if pending.reason == Reason.WAITING_FOR_POD and failed is not None:
        reason, detail = pod_failure(failed)
        message = f"attempt {attempt} failed ({reason}: {detail}); waiting to retry"
        return Verdict(Phase.PENDING, Reason.RETRYING, message)
    return pending


def cancel_requested(ftj: Body) -> bool:
    """Whether ``spec.cancel`` is set (it cannot be unset: the CRD refuses true -> false)."""
    return bool(ftj.get("spec", {}).get("cancel"))


#: What every Cancelled message ends with: what is kept, and that nothing brings the run back.
CANCELLED_IS_FINAL: Final = (
    "the FineTuneJob, its status and the checkpoints under its output.uri are kept; a cancelled"
    " FineTuneJob never runs again (spec.suspend has no effect): create a new FineTuneJob to train again"
)


def _cancelled_verdict(ftj: Body, job: Body | None, pods: Sequence[Body]) -> Verdict | None:
    """``spec.cancel``: phase Cancelled, unless the run had already ended (None: its outcome stands).

    Ended means a recorded Succeeded/Failed, or a Job the Job controller had already marked
    Complete or Failed before the operator acted on the cancel (the run won the race). Once
    Cancelled is recorded it stays, even if the stopping trainer exits 0 on its way out.
    """
    if not cancel_requested(ftj):
        return None
    recorded = (ftj.get("status") or {}).get("phase")
    if recorded in (Phase.SUCCEEDED, Phase.FAILED):
        return None
    ended = job is not None and _job_condition(
        job, "Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"
    )
    if recorded != Phase.CANCELLED and ended:
        return None
    deleting = job is not None and bool(job.get("metadata", {}).get("deletionTimestamp"))
    if job is not None and (not deleting or pods):
        message = (
            "spec.cancel: deleting the trainer Job; its pod gets SIGTERM and saves a checkpoint first; "
            + CANCELLED_IS_FINAL
        )
        return Verdict(Phase.CANCELLED, Reason.CANCELLING, message)
    return Verdict(
        Phase.CANCELLED,
        Reason.CANCELLED,
        "cancelled by spec.cancel: the trainer Job is deleted; " + CANCELLED_IS_FINAL,
    )


def verdict(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    blocked: Sequence[str] = (),
    hold: Hold | None = None,
) -> Verdict:
    """The phase, from the Job's conditions and the Pods' states.

    The previous status matters only once the Job is gone (e.g. deleted by its TTL).
    ``hold`` says why the children could not be created (the job waits, and is retried).
    """
    previous = ftj.get("status") or {}
    cancelled = _cancelled_verdict(ftj, job, pods)
    if cancelled is not None:
        return cancelled
    if job is None:
        if hold is not None and previous.get("phase") not in TERMINAL_PHASES:
            return Verdict(Phase.PENDING, hold.reason, hold.message)
        return _verdict_without_job(previous, blocked)
    if _job_condition(job, "Complete", "SuccessCriteriaMet"):
        # Pods being deleted count here (the Job's TTL deletes them): their summary is the result.
        pod = _latest_terminated([p for p in pods if p.get("status", {}).get("phase") == "Succeeded"])
        summary = ((pod and _terminated(pod)) or {}).get("message") or ""
        return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, summary.strip() or "training completed")
    if _job_condition(job, "Failed", "FailureTarget"):
        return _failed_verdict(job, pods)
    spec = ftj.get("spec", {})
    if job.get("spec", {}).get("suspend"):
        return _suspended_job_verdict(spec, job)
    if spec.get("suspend") and spec.get("scheduling", {}).get("queueName"):
        # Kueue suspends the Job once it has evicted the deactivated Workload.
        return Verdict(
            Phase.SUSPENDED,
            Reason.SUSPENDING,
            "Kueue is evicting the deactivated workload; checkpoints are kept",
        )
    return _active_job_verdict(job, pods)


def _attempts(job: Body) -> int:
    """Pods the Job has run: counted, active, and finished but not yet counted (the Job controller
    lists a finished pod in ``uncountedTerminatedPods`` first, and may mark the Job FailureTarget
    or SuccessCriteriaMet before it moves the pod to ``failed`` or ``succeeded``)."""
    status = job.get("status", {})
    uncounted = status.get("uncountedTerminatedPods") or {}
    counted = (
        int(status.get("failed") or 0) + int(status.get("succeeded") or 0) + int(status.get("active") or 0)
    )
    return counted + len(uncounted.get("failed") or []) + len(uncounted.get("succeeded") or [])


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


#: The phases that make each condition True.
_TRUE_IN: Final = {
    ConditionType.RUNNING: (Phase.RUNNING,),
    ConditionType.SUSPENDED: (Phase.SUSPENDED, Phase.QUEUED),
    ConditionType.SUCCEEDED: (Phase.SUCCEEDED,),
    ConditionType.FAILED: (Phase.FAILED,),
    ConditionType.CANCELLED: (Phase.CANCELLED,),
}
#: Why Running is False, by phase (the other conditions' False reasons are ``Not<Type>``).
_NOT_RUNNING: Final = {
    Phase.PENDING: Reason.NOT_STARTED,
    Phase.QUEUED: Reason.IN_QUEUE,
    Phase.SUSPENDED: Reason.SUSPENDED,
    Phase.SUCCEEDED: Reason.FINISHED,
    Phase.FAILED: Reason.FINISHED,
    Phase.CANCELLED: Reason.FINISHED,
}
_NOT: Final = {
    ConditionType.SUSPENDED: Reason.NOT_SUSPENDED,
    ConditionType.SUCCEEDED: Reason.NOT_SUCCEEDED,
    ConditionType.FAILED: Reason.NOT_FAILED,
    ConditionType.CANCELLED: Reason.NOT_CANCELLED,
}


def _false_message(kind: ConditionType, verdict_: Verdict, cancel: bool) -> str:
    """Why a False condition is False: the phase, and what spec.suspend or spec.cancel did not do."""
    if kind == ConditionType.SUSPENDED and verdict_.phase == Phase.CANCELLED:
        return "phase is Cancelled: a cancelled FineTuneJob is never resumed; spec.suspend has no effect"
    if kind == ConditionType.CANCELLED and cancel:
        return f"spec.cancel came after the run had ended: phase {verdict_.phase} is kept"
    return f"phase is {verdict_.phase}"


def _wanted_conditions(
    verdict_: Verdict, created: bool, cancel: bool = False
) -> dict[ConditionType, tuple[bool, str, str]]:
    """(status, reason, message) of each condition for a verdict (``cancel``: spec.cancel is set)."""
    if created:
        wanted = {ConditionType.CREATED: (True, str(Reason.JOB_CREATED), "the trainer Job exists")}
    else:
        reason = verdict_.reason or Reason.CREATING
        never = "cancelled before the trainer Job was created"
        why = never if verdict_.phase == Phase.CANCELLED else "the trainer Job does not exist yet"
        wanted = {ConditionType.CREATED: (False, reason, why)}
    for kind, phases in _TRUE_IN.items():
        if verdict_.phase in phases:
            wanted[kind] = (True, verdict_.reason, verdict_.message)
        else:
            false_reason = _NOT_RUNNING[verdict_.phase] if kind == ConditionType.RUNNING else _NOT[kind]
            wanted[kind] = (False, str(false_reason), _false_message(kind, verdict_, cancel))
    return wanted


def conditions(
    previous: Sequence[Mapping[str, Any]],
    verdict_: Verdict,
    created: bool,
    generation: int,
    now: datetime.datetime,
    *,
    cancel: bool = False,
) -> list[Obj]:
    """metav1.Conditions for the verdict; lastTransitionTime moves only when a status flips."""
    old = {c.get("type"): c for c in previous}
    wanted = _wanted_conditions(verdict_, created, cancel)
    result: list[Obj] = []
    for kind in ConditionType:
        is_true, reason, message = wanted[kind]
        status = "True" if is_true else "False"
        before = old.get(kind)
        changed = before is None or before.get("status") != status
        result.append(
            {
                "type": str(kind),
                "status": status,
                "reason": condition_reason(reason, str(kind)),
                "message": _truncate(message),
                "observedGeneration": generation,
                "lastTransitionTime": rfc3339(now) if changed else (before or {}).get("lastTransitionTime"),
            }
        )
    return result


def _recorded_fields(
    job: Body | None,
    pods: Sequence[Body],
    previous: Mapping[str, Any],
    result: Verdict,
    now: datetime.datetime,
) -> Obj:
    """startTime, attempts, completionTime and exitCode, from the Job and its pods (or as recorded)."""
    if job is None and previous.get("phase") in TERMINAL_PHASES:
        # The Job's TTL removed it: keep what was recorded when it ended.
        kept = ("startTime", "completionTime", "attempts", "exitCode")
        recorded = {key: previous[key] for key in kept if key in previous}
        if result.phase == Phase.CANCELLED:
            recorded.setdefault("completionTime", rfc3339(now))
        return recorded
    out: Obj = {}
    job_status = (job or {}).get("status", {})
    out["startTime"] = previous.get("startTime") or job_status.get("startTime")
    if job is not None:
        out["attempts"] = max(int(previous.get("attempts") or 0), _attempts(job)) or None
    if result.phase == Phase.SUCCEEDED:
        out["completionTime"] = job_status.get("completionTime") or rfc3339(now)
    elif result.phase == Phase.CANCELLED:  # when the operator first acted on spec.cancel
        out["completionTime"] = previous.get("completionTime") or rfc3339(now)
    elif result.phase == Phase.FAILED:
        cond = _job_condition(job or {}, "Failed", "FailureTarget") or {}
        out["completionTime"] = (
            previous.get("completionTime") or cond.get("lastTransitionTime") or rfc3339(now)
        )
    last = _latest_terminated(pods)
    out["exitCode"] = previous.get("exitCode") if last is None else (_terminated(last) or {}).get("exitCode")
    return out


def compute(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    now: datetime.datetime,
    *,
    blocked: Sequence[str] = (),
    hold: Hold | None = None,
) -> Obj:
    """The operator-owned status fields (``kubetune_api.status.OPERATOR_FIELDS``); absent keys mean "unset".

    ``blocked`` names children whose names are still held by another owner's objects;
    ``hold`` says why the children could not be created (a spec that does not parse, a refusal).
    """
    spec = ftj.get("spec", {})
    meta = ftj.get("metadata", {})
    previous: Mapping[str, Any] = ftj.get("status") or {}
    result = verdict(ftj, job, pods, blocked, hold)
    generation = int(meta.get("generation") or 0)
    # A run that ended (its Job then removed by its TTL) had its Job; a cancelled one maybe never did.
    ended_without_job = job is None and previous.get("phase") in (Phase.SUCCEEDED, Phase.FAILED)
    created = job is not None or ended_without_job or _condition_true(previous, ConditionType.CREATED)
    status: Obj = {
        "phase": str(result.phase),
        "reason": str(result.reason),
        "message": _truncate(result.message),
        "observedGeneration": generation,
        "jobName": names.job_name(meta.get("name", "")),
        "outputURI": spec.get("output", {}).get("uri"),
        "progressSummary": progress_summary(previous.get("progress")),
        "conditions": conditions(
            previous.get("conditions") or [], result, created, generation, now, cancel=cancel_requested(ftj)
        ),
        **_recorded_fields(job, pods, previous, result, now),
    }
    return {key: value for key, value in status.items() if value is not None}


def patch(previous: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Obj | None:
    """A JSON merge patch of ``status`` turning the owned keys of ``previous`` into ``desired``.

    ``None`` when nothing changed (so no write happens). Keys the operator does not own
    (the trainer's ``progress``) are never part of the patch.
    """
    previous = previous or {}
    changes: Obj = {}
    for key in OPERATOR_FIELDS:
        if key in desired:
            if previous.get(key) != desired[key]:
                changes[key] = desired[key]
        elif key in previous:
            changes[key] = None
    return changes or None
