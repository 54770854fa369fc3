"""The real Kueue controller (sigs.k8s.io/kueue, pinned in hack/tools/kueue) admits batch/v1 Jobs.

Kueue runs for this module only (``kubetune_localenv.kueue.start_kueue``), against the session's
control plane; its webhooks are not registered with the API server (see
docs/local-control-plane.md), so the Jobs here are created suspended, as Kueue's mutating
webhook would have made them.

Besides admission, this pins the two rules kubetune's suspend relies on, as the real controller
applies them:
- a Job's ``spec.suspend: true`` set by hand while its Workload is admitted is undone by Kueue;
- ``spec.active: false`` on the Workload evicts it (reason Deactivated) and Kueue suspends the
  Job itself; ``spec.active: true`` re-admits it and Kueue unsuspends the Job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_localenv import kueue
from kubetune_localenv.cluster import LocalEnv, ManagedProcess
from kubetune_localenv.stack import wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
WAIT = 60.0  # every wait is bounded; admission normally takes well under a second


@pytest.fixture(scope="module")
def kueue_manager(local_env: LocalEnv) -> Iterator[ManagedProcess]:
    with kueue.running_kueue(local_env) as proc:
        yield proc


@pytest.fixture
def queues(local_env: LocalEnv, kueue_manager: ManagedProcess, namespace: str) -> Iterator[kueue.Queues]:
    queues = kueue.create_queues(local_env, namespace)
    yield queues
    # While Kueue still runs: it holds finalizers on Workloads and queues that are in use. The
    # Workloads are deleted by name: the garbage collector may not watch the new type yet.
    local_env.kubectl("delete", "jobs", "--all", "-n", namespace, "--timeout=60s")
    local_env.kubectl("delete", "workloads.kueue.x-k8s.io", "--all", "-n", namespace, "--timeout=60s")
    kueue.delete_queues(local_env, queues)


def _batch(kube_api: Any) -> Any:
    from kubernetes import client

    return client.BatchV1Api(kube_api)


def _custom(kube_api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


def _create_queued_job(kube_api: Any, queues: kueue.Queues, name: str = "queued") -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "busybox",  # never pulled: no node runs these pods
        "command": ["sleep", "3600"],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {kueue.QUEUE_NAME_LABEL: queues.local_queue}},
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }
    created = _batch(kube_api).create_namespaced_job(queues.namespace, job)
    return dict(created.to_dict())


def _job(kube_api: Any, namespace: str, name: str) -> Any:
    return _batch(kube_api).read_namespaced_job(name, namespace)


def _workload_of(kube_api: Any, namespace: str, job_uid: str) -> dict[str, Any] | None:
    items = _custom(kube_api).list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
    for wl in items:
        owners = wl["metadata"].get("ownerReferences") or []
        if any(o["uid"] == job_uid and o["kind"] == "Job" and o.get("controller") for o in owners):
            return dict(wl)
    return None


def _workload(kube_api: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(_custom(kube_api).get_namespaced_custom_object(GROUP, VERSION, namespace, "workloads", name))


def _status_of(wl: dict[str, Any], type_: str) -> tuple[str, str] | None:
    cond = kueue.condition(wl, type_)
    return (cond["status"], cond["reason"]) if cond else None


def _set_active(kube_api: Any, namespace: str, name: str, active: bool) -> None:
    _custom(kube_api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "workloads", name, {"spec": {"active": active}}
    )


def _admitted_and_unsuspended(kube_api: Any, queues: kueue.Queues) -> tuple[str, str, dict[str, Any]]:
    """Create a queued Job, wait for Kueue to admit its Workload and unsuspend it."""
    created = _create_queued_job(kube_api, queues)
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]
    wl = wait_for("a Workload owned by the Job", lambda: _workload_of(kube_api, queues.namespace, uid), WAIT)
    wl_name = wl["metadata"]["name"]
    wl = wait_for(
        "the Workload to be admitted",
        lambda: (
            (w := _workload(kube_api, queues.namespace, wl_name))
            and _status_of(w, "Admitted") == ("True", "Admitted")
            and w
        ),
        WAIT,
    )
    wait_for(
        "Kueue to unsuspend the Job",
        lambda: _job(kube_api, queues.namespace, name).spec.suspend is False,
        WAIT,
    )
    return name, wl_name, wl


def test_kueue_admits_a_queued_job_and_unsuspends_it(kube_api: Any, queues: kueue.Queues) -> None:
    name, _wl_name, wl = _admitted_and_unsuspended(kube_api, queues)

    owner = next(o for o in wl["metadata"]["ownerReferences"] if o["kind"] == "Job")
    assert owner["name"] == name
    assert owner["controller"] is True
    assert wl["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == owner["uid"]
    assert wl["spec"]["queueName"] == queues.local_queue
    assert wl["status"]["admission"]["clusterQueue"] == queues.cluster_queue
    assignment = wl["status"]["admission"]["podSetAssignments"][0]
    assert assignment["flavors"] == {"cpu": queues.flavor, "memory": queues.flavor, "pods": queues.flavor}
    assert assignment["resourceUsage"] == {"cpu": "100m", "memory": "64Mi", "pods": "1"}
    assert _status_of(wl, "QuotaReserved") == ("True", "QuotaReserved")


def test_kueue_undoes_a_hand_set_suspend_on_an_admitted_job(kube_api: Any, queues: kueue.Queues) -> None:
    """Observed with Kueue v0.17: suspending the Job itself does not suspend the workload; Kueue
    sets ``spec.suspend`` back to false (within a second) and the Workload stays admitted. So
    kubetune must not suspend a Kueue-managed Job by its ``suspend`` field."""
    name, wl_name, _wl = _admitted_and_unsuspended(kube_api, queues)
    generation = _job(kube_api, queues.namespace, name).metadata.generation

    _batch(kube_api).patch_namespaced_job(name, queues.namespace, {"spec": {"suspend": True}})

    # Kueue's write comes after ours: the generation moves past the one our patch made.
    job = wait_for(
        "Kueue to set the Job's suspend back to false",
        lambda: (
            (j := _job(kube_api, queues.namespace, name)).metadata.generation >= generation + 2
            and j.spec.suspend is False
            and j
        ),
        WAIT,
    )
    assert job.spec.suspend is False
    # Still false a moment later, and the Workload was never evicted.
    time.sleep(2.0)
    assert _job(kube_api, queues.namespace, name).spec.suspend is False
    wl = _workload(kube_api, queues.namespace, wl_name)
    assert wl["spec"].get("active", True) is True
    assert _status_of(wl, "Admitted") == ("True", "Admitted")
    assert kueue.condition(wl, "Evicted") is None


def test_deactivating_the_workload_suspends_the_job_and_reactivating_resumes_it(
    kube_api: Any, queues: kueue.Queues
) -> None:
    name, wl_name, _wl = _admitted_and_unsuspended(kube_api, queues)
    ns = queues.namespace

    _set_active(kube_api, ns, wl_name, False)

    wait_for("Kueue to suspend the Job", lambda: _job(kube_api, ns, name).spec.suspend is True, WAIT)
    wl = wait_for(
        "the Workload to lose its admission",
        lambda: (
            (w := _workload(kube_api, ns, wl_name))
            and _status_of(w, "Admitted") == ("False", "NoReservation")
            and w
        ),
        WAIT,
    )
    evicted = kueue.condition(wl, "Evicted")
    assert evicted is not None
    assert (evicted["status"], evicted["reason"]) == ("True", "Deactivated")
    assert evicted["message"] == "The workload is deactivated"
    assert _status_of(wl, "QuotaReserved") == ("False", "Pending")
    assert _status_of(wl, "Requeued") == ("False", "Deactivated")
    assert wl["status"].get("admission") is None
    # Deactivated stays put: Kueue does not re-admit it on its own.
    time.sleep(2.0)
    assert _job(kube_api, ns, name).spec.suspend is True
    assert _status_of(_workload(kube_api, ns, wl_name), "Admitted") == ("False", "NoReservation")

    _set_active(kube_api, ns, wl_name, True)

    wl = wait_for(
        "the Workload to be admitted again",
        lambda: (
            (w := _workload(kube_api, ns, wl_name))
            and _status_of(w, "Admitted") == ("True", "Admitted")
            and w
        ),
        WAIT,
    )
    wait_for("Kueue to unsuspend the Job", lambda: _job(kube_api, ns, name).spec.suspend is False, WAIT)
    assert _status_of(wl, "Requeued") == ("True", "Reactivated")
    assert _status_of(wl, "Evicted") == ("False", "QuotaReserved")
    assert wl["status"]["admission"]["clusterQueue"] == queues.cluster_queue
