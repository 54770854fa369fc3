"""Reconciler.sync against the real API server (no kopf): which watch events a completed sync has
already answered, so that one sync serves a burst of events instead of one sync per event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kubetune_operator.kube import CONFIGMAPS, FINETUNEJOBS, JOBS, PODS, Kube
from kubetune_operator.reconcile import SKIPPED, STATUS_BATCH_SECONDS, Outcome, Reconciler, Trigger

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

Obj = dict[str, Any]
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"


def _sync(reconciler: Reconciler, namespace: str, name: str, trigger: Trigger | None = None) -> Outcome:
    outcome = reconciler.sync(namespace, name, trigger=trigger)
    assert isinstance(outcome, Outcome), f"expected a sync, got {outcome!r}"
    return outcome


def _versions(kube: Kube, namespace: str, name: str) -> tuple[Obj | None, list[Obj], list[str]]:
    job = kube.get(JOBS, namespace, f"{name}-trainer")
    pods = kube.list(PODS, namespace, f"kubetune.dev/finetunejob={name}")
    versions = [o["metadata"]["resourceVersion"] for o in [*([job] if job else []), *pods]]
    return job, pods, versions


def _stable(kube: Kube, namespace: str, name: str) -> tuple[Obj, Obj]:
    """The Job and its pod once kube-controller-manager is done with them (no node: the pod stays Pending)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job, pods, versions = _versions(kube, namespace, name)
        if job is not None and (job.get("status") or {}).get("active") == 1 and pods:
            time.sleep(2)  # its last status updates, if any
            job, pods, again = _versions(kube, namespace, name)
            if job is not None and again == versions:
                return job, pods[0]
        time.sleep(0.5)
    raise TimeoutError(f"the Job of {name} did not settle")


def test_a_sync_answers_what_it_read_and_wrote(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    created = create_ftj("echo")
    reconciler = Reconciler(kube, TRAINER_IMAGE)
    arrived = reconciler.monotonic()
    first = _sync(reconciler, namespace, "echo", Trigger(created, arrived))
    assert first.created
    assert first.patched

    # The same ADDED event handed over again (a second handler): answered.
    assert reconciler.sync(namespace, "echo", trigger=Trigger(created, arrived)) is SKIPPED
    # The echo of its own status patch, arriving later: answered (that sync wrote this version).
    assert reconciler.sync(namespace, "echo", trigger=Trigger(first.ftj, reconciler.monotonic())) is SKIPPED

    # kopf's annotations change nothing a sync reads; the trainer's progress does.
    annotated = kube.patch(FINETUNEJOBS, namespace, "echo", {"metadata": {"annotations": {"kopf": "x"}}})
    assert reconciler.sync(namespace, "echo", trigger=Trigger(annotated, reconciler.monotonic())) is SKIPPED
    progress = {"status": {"progress": {"step": 3, "totalSteps": 9}}}
    reported = kube.patch(FINETUNEJOBS, namespace, "echo", progress, "status")
    synced = _sync(reconciler, namespace, "echo", Trigger(reported, reconciler.monotonic()))
    assert synced.deferred is not None  # a change within the phase: batched (see below)
    time.sleep(synced.deferred)
    assert _sync(reconciler, namespace, "echo").ftj["status"]["progressSummary"] == "3/9"


def test_job_and_pod_events_are_answered_by_version(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    create_ftj("versions")
    reconciler = Reconciler(kube, TRAINER_IMAGE)
    _sync(reconciler, namespace, "versions")
    job, pod = _stable(kube, namespace, "versions")
    _sync(reconciler, namespace, "versions")  # reads the Job and the pod as they are now

    later = reconciler.monotonic()
    assert reconciler.sync(namespace, "versions", trigger=Trigger(job, later)) is SKIPPED
    assert reconciler.sync(namespace, "versions", trigger=Trigger(pod, later)) is SKIPPED
    # A version no sync has read asks for one.
    changed = kube.patch(JOBS, namespace, "versions-trainer", {"metadata": {"labels": {"seen": "no"}}})
    _sync(reconciler, namespace, "versions", Trigger(changed, reconciler.monotonic()))
    assert reconciler.sync(namespace, "versions", trigger=Trigger(changed, reconciler.monotonic())) is SKIPPED


def test_an_event_that_arrived_before_a_sync_began_is_answered_by_it(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    create_ftj("early")
    reconciler = Reconciler(kube, TRAINER_IMAGE)
    unseen: Obj = {"kind": "Pod", "metadata": {"uid": "not-read", "resourceVersion": "1"}}
    before = reconciler.monotonic()
    _sync(reconciler, namespace, "early")
    # That sync's reads (quorum reads) came after the event: whatever it says, they saw it.
    assert reconciler.sync(namespace, "early", trigger=Trigger(unseen, before)) is SKIPPED
    # One that arrived after the sync began may say something it did not see.
    _sync(reconciler, namespace, "early", Trigger(unseen, reconciler.monotonic()))


def test_a_held_job_is_retried_by_a_sync_without_trigger(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    created = create_ftj("held", identity={"serviceAccountName": "missing"})
    reconciler = Reconciler(kube, TRAINER_IMAGE)
    arrived = reconciler.monotonic()
    assert _sync(reconciler, namespace, "held", Trigger(created, arrived)).hold is not None
    # Events are answered as usual; the operator's retry timer syncs with no trigger, so it runs.
    assert reconciler.sync(namespace, "held", trigger=Trigger(created, arrived)) is SKIPPED
    assert _sync(reconciler, namespace, "held").hold is not None
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "missing", "namespace": namespace},
        }
    )
    assert _sync(reconciler, namespace, "held").hold is None
    assert kube.get(JOBS, namespace, "held-trainer") is not None


def test_the_first_sync_by_a_reconciler_recreates_missing_children(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    create_ftj("adopt")
    before = Reconciler(kube, TRAINER_IMAGE)
    _sync(before, namespace, "adopt")
    kube.delete(CONFIGMAPS, namespace, "adopt-config")
    # The same reconciler only creates a Job that was never created, not every missing child.
    assert _sync(before, namespace, "adopt").created == ()
    assert kube.get(CONFIGMAPS, namespace, "adopt-config") is None
    # A new one (an operator start) adopts what exists and re-creates what is missing, once.
    after = Reconciler(kube, TRAINER_IMAGE)
    assert _sync(after, namespace, "adopt").created == ("ConfigMap",)
    assert _sync(after, namespace, "adopt").created == ()


def test_forget_drops_what_was_seen(kube: Kube, namespace: str, create_ftj: Callable[..., Obj]) -> None:
    created = create_ftj("gone")
    reconciler = Reconciler(kube, TRAINER_IMAGE)
    arrived = reconciler.monotonic()
    _sync(reconciler, namespace, "gone", Trigger(created, arrived))
    reconciler.forget(namespace, "gone")
    _sync(reconciler, namespace, "gone", Trigger(created, arrived))


def test_a_change_within_a_phase_waits_for_the_batch_window(
    kube: Kube, namespace: str, create_ftj: Callable[..., Obj]
) -> None:
    create_ftj("batch")
    now = [100.0]
    reconciler = Reconciler(kube, TRAINER_IMAGE, monotonic=lambda: now[0])
    first = _sync(reconciler, namespace, "batch")
    assert (first.after.phase, first.after.reason, first.deferred) == ("Pending", "WaitingForPod", None)
    _stable(kube, namespace, "batch")  # the Job controller made its pod

    now[0] += 1.0  # within STATUS_BATCH_SECONDS of the last write: held back, and when to try again
    held = _sync(reconciler, namespace, "batch")
    assert not held.patched
    assert held.deferred == pytest.approx(STATUS_BATCH_SECONDS - 1.0)
    assert held.after.reason == "WaitingForPod"  # what the status still says
    assert _status(kube, namespace, "batch")["reason"] == "WaitingForPod"

    now[0] += STATUS_BATCH_SECONDS
    written = _sync(reconciler, namespace, "batch")
    assert written.patched
    assert written.deferred is None
    assert _status(kube, namespace, "batch")["reason"] == "PodStarting"

    # A phase change is written at once, however recent the last write.
    kube.patch(FINETUNEJOBS, namespace, "batch", {"spec": {"suspend": True}})
    suspended = _sync(reconciler, namespace, "batch")
    assert suspended.patched
    assert _status(kube, namespace, "batch")["phase"] == "Suspended"


def _status(kube: Kube, namespace: str, name: str) -> Obj:
    ftj = kube.get(FINETUNEJOBS, namespace, name)
    assert ftj is not None
    status: Obj = ftj["status"]
    return status
