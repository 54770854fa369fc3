"""Suspend and resume under the real Kueue: kubetune switches the Workload, never the Job.

Kueue owns a queued Job's ``spec.suspend``: it undoes a suspend by anyone else
(tests/controlplane/test_kueue.py shows it). So ``spec.suspend`` of a FineTuneJob with a
``scheduling.queueName`` sets the Workload's ``spec.active``, and Kueue evicts (suspending the
Job) or re-admits it. The control plane, Kueue and the operator are real; pod states are set by
the fake kubelet of tests/operator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_localenv import kueue
from kubetune_operator.kube import FINETUNEJOBS, JOBS, WORKLOADS

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

Obj = dict[str, Any]


@pytest.fixture
def kueue_queues(local_env: Any, namespace: str) -> Iterator[kueue.Queues]:
    with kueue.running_kueue(local_env):
        queues = kueue.create_queues(local_env, namespace)
        try:
            yield queues
        finally:
            kueue.delete_queues(local_env, queues)


def _workload(harness: Any, job: Obj) -> Obj | None:
    found: list[Obj] = harness.kube.list(
        WORKLOADS, harness.namespace, f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}"
    )
    return found[0] if found else None


def _condition(obj: Obj | None, kind: str) -> Obj:
    return kueue.condition(obj, kind) or {}


def test_suspend_deactivates_the_workload_and_resume_readmits_it(
    kueue_queues: kueue.Queues, run_operator: Any, harness: Any
) -> None:
    with run_operator():
        harness.create("kq", scheduling={"queueName": kueue_queues.local_queue}, resources={"gpus": 0})
        # Kueue admits the Job (it unsuspends it), the Job controller creates the pod.
        pod = harness.kubelet.wait_pod("kq", timeout=60)
        job = harness.kube.get(JOBS, harness.namespace, "kq-trainer")
        workload = harness.wait_for("the Workload", lambda: _workload(harness, job))
        assert _condition(workload, "Admitted").get("status") == "True"
        harness.kubelet.run(pod)
        harness.wait_phase("kq", "Running")

        harness.patch_ftj("kq", {"spec": {"suspend": True}})

        def deactivated() -> Obj | None:
            found = _workload(harness, job)
            evicted = _condition(found, "Evicted")
            return (
                found if evicted.get("status") == "True" and evicted.get("reason") == "Deactivated" else None
            )

        workload = harness.wait_for("Kueue to evict the deactivated Workload", deactivated, timeout=60)
        assert workload["spec"]["active"] is False
        status = harness.wait_phase("kq", "Suspended", "Suspended", timeout=60)
        suspended = {c["type"]: c["status"] for c in status["conditions"]}
        assert (suspended["Suspended"], suspended["Running"]) == ("True", "False")
        assert harness.kube.get(JOBS, harness.namespace, "kq-trainer")["spec"]["suspend"] is True

        harness.patch_ftj("kq", {"spec": {"suspend": False}})

        def readmitted() -> Obj | None:
            found = _workload(harness, job)
            ok = found is not None and found["spec"].get("active", True)
            return found if ok and _condition(found, "Admitted").get("status") == "True" else None

        harness.wait_for("Kueue to admit the Workload again", readmitted, timeout=60)
        harness.wait_for(
            "the Job to be unsuspended by Kueue",
            lambda: harness.kube.get(JOBS, harness.namespace, "kq-trainer")["spec"]["suspend"] is False,
            timeout=60,
        )
        second = harness.wait_for(
            "a new trainer pod",
            lambda: next(
                (p for p in harness.kubelet.pods("kq") if p["metadata"]["uid"] != pod["metadata"]["uid"]),
                None,
            ),
            timeout=60,
        )
        harness.kubelet.run(second)
        harness.wait_phase("kq", "Running", timeout=60)

        # Clean up while Kueue runs (it holds finalizers on Workloads).
        harness.kube.delete(FINETUNEJOBS, harness.namespace, "kq")
        harness.wait_for("the Workload to go", lambda: _workload(harness, job) is None, timeout=90)


def test_cancel_deletes_the_job_and_its_workload(
    kueue_queues: kueue.Queues, run_operator: Any, harness: Any
) -> None:
    """spec.cancel on a job Kueue admitted: the Job is deleted (foreground), and with it the
    Workload it owns (Kueue releases its finalizer); the FineTuneJob stays, Cancelled."""
    with run_operator():
        harness.create("kc", scheduling={"queueName": kueue_queues.local_queue}, resources={"gpus": 0})
        pod = harness.kubelet.wait_pod("kc", timeout=60)
        job = harness.kube.get(JOBS, harness.namespace, "kc-trainer")
        harness.wait_for("the Workload", lambda: _workload(harness, job))
        harness.kubelet.run(pod)
        harness.wait_phase("kc", "Running")

        harness.patch_ftj("kc", {"spec": {"cancel": True}})
        status = harness.wait_phase("kc", "Cancelled", "Cancelled", timeout=90)
        assert harness.kube.get(JOBS, harness.namespace, "kc-trainer") is None
        harness.wait_for("the Workload to go", lambda: _workload(harness, job) is None, timeout=90)
        assert harness.kubelet.pods("kc") == []
        assert {c["type"]: c["status"] for c in status["conditions"]}["Cancelled"] == "True"
        assert harness.kube.get(FINETUNEJOBS, harness.namespace, "kc") is not None
