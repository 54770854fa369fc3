"""Unit tests of the pure status computation (Job + Pods -> phase, reason, conditions)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from kubetune_api.reasons import ConditionType, Reason
from kubetune_operator import builders, status

Obj = dict[str, Any]
NOW = datetime.datetime(2025, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(minutes=5)
IMAGE = "registry.example/kubetune/trainer:test"


def _job(
    ftj: Obj, *, suspend: bool | None = None, conditions: list[Obj] | None = None, **job_status: Any
) -> Obj:
    job = builders.job(ftj, IMAGE)
    job["metadata"]["uid"] = "job-uid"
    if suspend is not None:
        job["spec"]["suspend"] = suspend
    job["status"] = dict(job_status)
    if conditions:
        job["status"]["conditions"] = conditions
    return job


def _cond(kind: str, reason: str = "", message: str = "") -> Obj:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-06-01T11:59:00Z",
    }


def _pod(phase: str, created: str = "2025-06-01T11:00:00Z", **container_state: Any) -> Obj:
    pod: Obj = {
        "metadata": {"name": f"pod-{created}", "creationTimestamp": created},
        "status": {"phase": phase},
    }
    if container_state:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": container_state}]
    return pod


def _terminated(exit_code: int, reason: str = "Error", message: str = "") -> Obj:
    return {"exitCode": exit_code, "reason": reason, "message": message}


def _with_status(ftj: Obj, computed: Obj) -> Obj:
    return {**ftj, "status": {**ftj.get("status", {}), **computed}}


def test_fresh_finetunejob_is_pending_while_creating(make_ftj: Any) -> None:
    result = status.compute(make_ftj(), None, [], NOW)
    assert (result["phase"], result["reason"]) == ("Pending", "Creating")
    assert result["outputURI"] == "s3://results/run-1"
    assert result["jobName"] == "demo-trainer"
    assert result["observedGeneration"] == 1
    created = next(c for c in result["conditions"] if c["type"] == "Created")
    assert created["status"] == "False"


def test_job_without_pods_waits_for_a_pod(make_ftj: Any) -> None:
    ftj = make_ftj()
    result = status.compute(ftj, _job(ftj), [], NOW)
    assert (result["phase"], result["reason"]) == ("Pending", "WaitingForPod")
    conditions = {c["type"]: c for c in result["conditions"]}
    assert conditions["Created"]["status"] == "True"
    assert conditions["Running"]["status"] == "False"
    assert [c["type"] for c in result["conditions"]] == [str(kind) for kind in ConditionType]


@pytest.mark.parametrize(
    ("waiting_reason", "expected"),
    [
        ("ImagePullBackOff", "ImagePullBackOff"),
        ("ErrImagePull", "ErrImagePull"),
        ("ContainerCreating", "PodStarting"),
    ],
)
def test_pending_pod_surfaces_waiting_reason(make_ftj: Any, waiting_reason: str, expected: str) -> None:
    ftj = make_ftj()
    pod = _pod("Pending", waiting={"reason": waiting_reason, "message": "Back-off pulling image"})
    result = status.compute(ftj, _job(ftj, active=1), [pod], NOW)
    assert (result["phase"], result["reason"]) == ("Pending", expected)


def test_unschedulable_pod(make_ftj: Any) -> None:
    ftj = make_ftj()
    pod = _pod("Pending")
    pod["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes have a GPU",
        }
    ]
    result = status.compute(ftj, _job(ftj, active=1), [pod], NOW)
    assert (result["phase"], result["reason"], result["message"]) == (
        "Pending",
        "Unschedulable",
        "0/3 nodes have a GPU",
    )


def test_running_pod(make_ftj: Any) -> None:
    ftj = make_ftj()
    job = _job(ftj, active=1, startTime="2025-06-01T11:00:05Z")
    result = status.compute(ftj, job, [_pod("Running", running={"startedAt": "2025-06-01T11:00:10Z"})], NOW)
    assert (result["phase"], result["reason"]) == ("Running", "Training")
    assert result["startTime"] == "2025-06-01T11:00:05Z"
    assert result["attempts"] == 1
    assert "completionTime" not in result
    running = next(c for c in result["conditions"] if c["type"] == "Running")
    assert (running["status"], running["lastTransitionTime"]) == ("True", "2025-06-01T12:00:00Z")


def test_finished_pod_before_the_job_completes_stays_running(make_ftj: Any) -> None:
    ftj = make_ftj()
    pod = _pod("Succeeded", terminated=_terminated(0, "Completed", '{"phase": "Succeeded"}'))
    result = status.compute(ftj, _job(ftj, succeeded=1), [pod], NOW)
    assert (result["phase"], result["reason"]) == ("Running", "Completing")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("OOMKilled", "OOMKilled"),
        ("OutOfnvidia.com/gpu", "OutOfnvidia_com_gpu"),
        ("Node-Affinity", "Node_Affinity"),
        ("", "Failed"),
        ("42", "Failed"),
    ],
)
def test_condition_reasons_fit_the_api_pattern(reason: str, expected: str) -> None:
    assert status.condition_reason(reason, "Failed") == expected


def test_a_failed_pod_not_yet_counted_by_the_job_is_an_attempt(make_ftj: Any) -> None:
    """FailureTarget comes with the pod in uncountedTerminatedPods, before status.failed counts it."""
    ftj = make_ftj()
    pod = _pod("Failed", terminated=_terminated(42, "Error", "record 3: 'messages' is missing"))
    job = _job(
        ftj,
        uncountedTerminatedPods={"failed": ["pod-uid"]},
        conditions=[_cond("FailureTarget", "PodFailurePolicy", "exit code 42")],
    )
    result = status.compute(ftj, job, [pod], NOW)
    assert (result["phase"], result["reason"], result["attempts"]) == ("Failed", "InvalidDataset", 1)


def test_retry_after_oom_mentions_the_previous_failure(make_ftj: Any) -> None:
    ftj = make_ftj()
    first = _pod("Failed", "2025-06-01T11:00:00Z", terminated=_terminated(137, "OOMKilled"))
    second = _pod("Running", "2025-06-01T11:10:00Z", running={})
    result = status.compute(ftj, _job(ftj, active=1, failed=1), [first, second], NOW)
    assert result["phase"] == "Running"
    assert result["attempts"] == 2
    assert "OOMKilled" in result["message"]
    assert result["exitCode"] == 137


def test_oomkilled_failure_is_the_reason(make_ftj: Any) -> None:
    ftj = make_ftj()
    pods = [
        _pod("Failed", "2025-06-01T11:00:00Z", terminated=_terminated(137, "OOMKilled")),
        _pod("Failed", "2025-06-01T11:20:00Z", terminated=_terminated(137, "OOMKilled")),
    ]
    job = _job(
        ftj,
        failed=2,
        conditions=[_cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
    )
    result = status.compute(ftj, job, pods, NOW)
    assert (result["phase"], result["reason"]) == ("Failed", "OOMKilled")
    assert "backoff limit" in result["message"]
    assert result["completionTime"] == "2025-06-01T11:59:00Z"
    conditions = {c["type"]: c for c in result["conditions"]}
    assert conditions["Failed"]["status"] == "True"
    assert conditions["Failed"]["reason"] == "OOMKilled"
    assert conditions["Running"]["status"] == "False"


@pytest.mark.parametrize(
    ("exit_code", "reason"),
    [(42, "InvalidDataset"), (43, "InvalidConfig"), (44, "WorldSizeMismatch"), (1, "Error")],
)
def test_exit_codes_become_reasons(make_ftj: Any, exit_code: int, reason: str) -> None:
    ftj = make_ftj()
    pod = _pod("Failed", terminated=_terminated(exit_code, message="record 17: missing 'messages'"))
    job = _job(ftj, failed=1, conditions=[_cond("Failed", "PodFailurePolicy")])
    result = status.compute(ftj, job, [pod], NOW)
    assert (result["phase"], result["reason"], result["exitCode"]) == ("Failed", reason, exit_code)
    assert "record 17: missing 'messages'" in result["message"]


def test_deadline_exceeded(make_ftj: Any) -> None:
    ftj = make_ftj(lifecycle={"activeDeadlineSeconds": 60})
    job = _job(
        ftj,
        conditions=[
            _cond("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline")
        ],
    )
    result = status.compute(ftj, job, [], NOW)
    assert (result["phase"], result["reason"]) == ("Failed", "DeadlineExceeded")


def test_a_disrupted_or_deleted_pod_says_it_does_not_count(make_ftj: Any) -> None:
    evicted = _pod("Failed", terminated=_terminated(137, message="...2 KiB of log tail..."))
    evicted["status"]["conditions"] = [
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting",
        }
    ]
    reason, message = status.pod_failure(evicted)
    assert reason == "Evicted"
    assert (
        message
        == "Eviction API: evicting (EvictionByEvictionAPI; not counted against lifecycle.backoffLimit)"
    )
    deleted = _pod("Failed", terminated=_terminated(143, message='{"phase": "Interrupted"}'))
    assert "stopped by SIGTERM after saving its checkpoint" in status.pod_failure(deleted)[1]


def test_evicted_pod_reason(make_ftj: Any) -> None:
    ftj = make_ftj()
    pod = _pod("Failed")
    pod["status"].update(reason="Evicted", message="The node was low on resource: ephemeral-storage.")
    job = _job(ftj, failed=1, conditions=[_cond("Failed", "BackoffLimitExceeded")])
    assert status.compute(ftj, job, [pod], NOW)["reason"] == "Evicted"


def test_success_reports_the_trainer_summary(make_ftj: Any) -> None:
    ftj = make_ftj()
    summary = '{"adapterUri": "s3://results/run-1/adapter", "trainLoss": 1.23}'
    pod = _pod("Succeeded", terminated=_terminated(0, "Completed", summary))
    job = _job(ftj, succeeded=1, completionTime="2025-06-01T11:58:00Z", conditions=[_cond("Complete")])
    result = status.compute(ftj, job, [pod], NOW)
    assert (result["phase"], result["reason"], result["message"]) == ("Succeeded", "Completed", summary)
    assert result["completionTime"] == "2025-06-01T11:58:00Z"
    assert result["exitCode"] == 0


def test_suspended_and_queued(make_ftj: Any) -> None:
    suspended = make_ftj(suspend=True)
    assert status.compute(suspended, _job(suspended, suspend=True), [], NOW)["phase"] == "Suspended"
    stopping = status.compute(suspended, _job(suspended, suspend=True, active=1), [], NOW)
    assert (stopping["phase"], stopping["reason"]) == ("Suspended", "Suspending")

    queued = make_ftj(scheduling={"queueName": "team-a"})
    result = status.compute(queued, _job(queued, suspend=True), [], NOW)
    assert (result["phase"], result["reason"]) == ("Queued", "WaitingForAdmission")
    assert {c["type"]: c["status"] for c in result["conditions"]}["Suspended"] == "True"


def test_outcome_survives_the_job_ttl(make_ftj: Any) -> None:
    ftj = make_ftj()
    job = _job(
        ftj,
        succeeded=1,
        startTime="2025-06-01T11:00:00Z",
        completionTime="2025-06-01T11:58:00Z",
        conditions=[_cond("Complete")],
    )
    done = _with_status(ftj, status.compute(ftj, job, [_pod("Succeeded", terminated=_terminated(0))], NOW))
    after_ttl = status.compute(done, None, [], LATER)
    assert status.patch(done["status"], after_ttl) is None


def test_job_deleted_before_the_end_fails(make_ftj: Any) -> None:
    ftj = make_ftj()
    running = _with_status(ftj, status.compute(ftj, _job(ftj, active=1), [_pod("Running", running={})], NOW))
    result = status.compute(running, None, [], LATER)
    assert (result["phase"], result["reason"]) == ("Failed", "JobDeleted")


def test_transition_times_move_only_when_a_condition_flips(make_ftj: Any) -> None:
    ftj = make_ftj()
    job = _job(ftj, active=1)
    first = _with_status(ftj, status.compute(ftj, job, [_pod("Pending")], NOW))
    again = status.compute(first, job, [_pod("Pending")], LATER)
    assert status.patch(first["status"], again) is None  # nothing changed: no write

    running = status.compute(first, job, [_pod("Running", running={})], LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in running["conditions"]}
    assert times["Running"] == "2025-06-01T12:05:00Z"
    assert times["Created"] == "2025-06-01T12:00:00Z"
    assert times["Failed"] == "2025-06-01T12:00:00Z"


def test_patch_never_touches_trainer_progress(make_ftj: Any) -> None:
    ftj = make_ftj()
    progress = {"step": 40, "totalSteps": 200, "loss": 1.7, "updateTime": "2025-06-01T11:59:30Z"}
    ftj["status"] = {"progress": progress}
    desired = status.compute(ftj, _job(ftj, active=1), [_pod("Running", running={})], NOW)
    patch = status.patch(ftj["status"], desired)
    assert patch is not None
    assert "progress" not in patch
    assert patch["progressSummary"] == "40/200"


def test_patch_removes_keys_that_no_longer_apply() -> None:
    assert status.patch({"phase": "Running", "exitCode": 1}, {"phase": "Running"}) == {"exitCode": None}


@pytest.mark.parametrize(
    ("progress", "summary"),
    [(None, None), ({}, None), ({"step": 5}, "5"), ({"step": 5, "totalSteps": 50}, "5/50")],
)
def test_progress_summary(progress: Obj | None, summary: str | None) -> None:
    assert status.progress_summary(progress) == summary


def test_waiting_to_retry_after_a_failed_attempt(make_ftj: Any) -> None:
    ftj = make_ftj()
    oom = _pod("Failed", terminated=_terminated(137, "OOMKilled"))
    result = status.compute(ftj, _job(ftj, failed=1), [oom], NOW)
    assert (result["phase"], result["reason"]) == ("Pending", "Retrying")
    assert "OOMKilled" in result["message"]


def test_children_held_by_another_owner(make_ftj: Any) -> None:
    result = status.compute(make_ftj(), None, [], NOW, blocked=["ConfigMap demo-config"])
    assert (result["phase"], result["reason"]) == ("Pending", "WaitingForCleanup")
    assert "ConfigMap demo-config" in result["message"]


def test_summary_of_a_pod_being_deleted_is_still_the_result(make_ftj: Any) -> None:
    """The Job's TTL deletes the pods while the Job still stands: their summary is the result."""
    ftj = make_ftj()
    pod = _pod("Succeeded", terminated=_terminated(0, "Completed", '{"trainLoss": 1.0}'))
    pod["metadata"]["deletionTimestamp"] = "2025-06-01T11:59:30Z"
    job = _job(ftj, succeeded=1, conditions=[_cond("Complete")])
    assert status.compute(ftj, job, [pod], NOW)["message"] == '{"trainLoss": 1.0}'


@pytest.mark.parametrize(
    ("phase_of", "reason"),
    [("pending", "Pending"), ("queued", "Queued"), ("suspended", "Suspended"), ("succeeded", "Finished")],
)
def test_running_false_says_why_by_phase(make_ftj: Any, phase_of: str, reason: str) -> None:
    specs: dict[str, Obj] = {
        "pending": {},
        "queued": {"scheduling": {"queueName": "q"}},
        "suspended": {"suspend": True},
    }
    ftj = make_ftj(**specs.get(phase_of, {}))
    if phase_of == "succeeded":
        job = _job(ftj, succeeded=1, conditions=[_cond("Complete")])
    else:
        job = _job(ftj, suspend=phase_of != "pending")
    result = status.compute(ftj, job, [], NOW)
    running = next(c for c in result["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", reason)


def test_a_spec_that_does_not_parse_waits_with_the_field_named(make_ftj: Any) -> None:
    ftj = make_ftj(training={"stepsPerMoon": 3})
    with pytest.raises(builders.InvalidSpecError) as caught:
        builders.job(ftj, IMAGE)
    assert str(caught.value).startswith("training.stepsPerMoon: Extra inputs are not permitted")
    result = status.compute(ftj, None, [], NOW, hold=status.Hold(Reason.INVALID_SPEC, str(caught.value)))
    assert (result["phase"], result["reason"]) == ("Pending", "InvalidSpec")
    assert "training.stepsPerMoon" in result["message"]


def _conditions(result: Obj) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in result["conditions"]}


def test_cancel_of_a_running_job_is_cancelling_then_cancelled_and_stays(make_ftj: Any) -> None:
    ftj = make_ftj()
    pod = _pod("Running", running={})
    running = _with_status(ftj, status.compute(ftj, _job(ftj, active=1), [pod], NOW))
    cancelled = {**running, "spec": {**running["spec"], "cancel": True}}

    # The operator has asked for the deletion; the pod is still stopping (saving its checkpoint).
    deleting = _job(cancelled, active=1)
    deleting["metadata"]["deletionTimestamp"] = "2025-06-01T12:00:00Z"
    stopping = status.compute(cancelled, deleting, [pod], NOW)
    assert (stopping["phase"], stopping["reason"]) == ("Cancelled", "Cancelling")
    assert stopping["completionTime"] == "2025-06-01T12:00:00Z"
    conditions = _conditions(stopping)
    assert conditions["Cancelled"][:2] == ("True", "Cancelling")
    assert conditions["Running"][:2] == ("False", "Finished")
    assert conditions["Created"][0] == "True"

    # The pod is gone, then the Job: Cancelled, with nothing but the reason changing afterwards.
    stopped = _with_status(cancelled, stopping)
    assert status.compute(stopped, deleting, [], LATER)["reason"] == "Cancelled"
    gone = _with_status(stopped, status.compute(stopped, None, [], LATER))
    assert (gone["status"]["phase"], gone["status"]["reason"]) == ("Cancelled", "Cancelled")
    assert gone["status"]["completionTime"] == "2025-06-01T12:00:00Z"  # when the cancel took effect
    assert "create a new FineTuneJob" in gone["status"]["message"]
    assert status.patch(gone["status"], status.compute(gone, None, [], LATER)) is None  # settled

    # spec.suspend false (or true) afterwards changes nothing, and the Suspended condition says so.
    toggled = {**gone, "spec": {**gone["spec"], "suspend": False}}
    again = status.compute(toggled, None, [], LATER)
    assert (again["phase"], again["reason"]) == ("Cancelled", "Cancelled")
    suspended = _conditions(again)["Suspended"]
    assert suspended[:2] == ("False", "NotSuspended")
    assert "spec.suspend has no effect" in suspended[2]


def test_cancel_wins_over_a_job_deleted_and_a_late_success(make_ftj: Any) -> None:
    """Without spec.cancel a vanished Job is JobDeleted; with it, it is the cancel. A trainer that
    exits 0 while stopping does not turn a recorded Cancelled into Succeeded."""
    ftj = make_ftj(cancel=True)
    pod = _pod("Running", running={})
    cancelling = _with_status(ftj, status.compute(ftj, _job(ftj, active=1), [pod], NOW))
    assert cancelling["status"]["phase"] == "Cancelled"
    late = _job(cancelling, succeeded=1, conditions=[_cond("Complete")])
    late["metadata"]["deletionTimestamp"] = "2025-06-01T12:00:00Z"
    assert status.compute(cancelling, late, [], LATER)["phase"] == "Cancelled"
    assert status.compute(cancelling, None, [], LATER)["reason"] == "Cancelled"


@pytest.mark.parametrize(
    ("job_status", "phase"),
    [
        ({"succeeded": 1, "conditions": [_cond("Complete")]}, "Succeeded"),
        ({"failed": 1, "conditions": [_cond("Failed", "BackoffLimitExceeded")]}, "Failed"),
    ],
)
def test_cancel_after_the_run_ended_keeps_its_outcome(make_ftj: Any, job_status: Obj, phase: str) -> None:
    ftj = make_ftj()
    ended = _with_status(ftj, status.compute(ftj, _job(ftj, **job_status), [], NOW))
    assert ended["status"]["phase"] == phase
    cancelled = {**ended, "spec": {**ended["spec"], "cancel": True}}
    for job in (_job(cancelled, **job_status), None):  # the Job still there, or gone by its TTL
        result = status.compute(cancelled, job, [], LATER)
        assert result["phase"] == phase
        assert _conditions(result)["Cancelled"] == (
            "False",
            "NotCancelled",
            f"spec.cancel came after the run had ended: phase {phase} is kept",
        )
        assert status.verdict(cancelled, job, []).phase == phase  # so the operator deletes nothing
    # Ended but not yet recorded (the Job finished before the operator saw the cancel): the outcome too.
    racing = {**ftj, "spec": {**ftj["spec"], "cancel": True}}
    assert status.compute(racing, _job(racing, **job_status), [], LATER)["phase"] == phase


def test_cancelled_before_any_job_was_created(make_ftj: Any) -> None:
    ftj = make_ftj(cancel=True)
    first = _with_status(ftj, status.compute(ftj, None, [], NOW))
    assert (first["status"]["phase"], first["status"]["reason"]) == ("Cancelled", "Cancelled")
    created = _conditions(first["status"])["Created"]
    assert created == ("False", "Cancelled", "cancelled before the trainer Job was created")
    assert status.patch(first["status"], status.compute(first, None, [], LATER)) is None
