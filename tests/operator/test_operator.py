"""The operator (kopf, in this process) against the real kube-apiserver and kube-controller-manager.

There is no node: the tests play the kubelet by writing pod status through the API
(see ``FakeKubelet``), while the real Job controller creates, counts and replaces pods and the
real garbage collector deletes children.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.trainer import TrainerConfig
from kubetune_operator import names
from kubetune_operator.kube import (
    CONFIGMAPS,
    FINETUNEJOBS,
    JOBS,
    NETWORKPOLICIES,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

Obj = dict[str, Any]


def _conditions(status: Obj) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def test_apply_creates_the_children(operator: Any, harness: Any) -> None:
    ftj = harness.create(
        "sft",
        model={"source": "org/model", "tokenSecretRef": {"name": "hf"}},
        storage={"endpoint": "http://s3.local:9000", "credentialsSecretRef": {"name": "s3"}},
        lifecycle={"backoffLimit": 2, "activeDeadlineSeconds": 3600},
    )
    uid = ftj["metadata"]["uid"]
    status = harness.wait_phase("sft", "Pending")
    assert status["observedGeneration"] == 1
    assert _conditions(status)["Created"] == "True"
    assert status["jobName"] == "sft-trainer"
    assert status["outputURI"] == "s3://results/run-1"

    job = harness.kube.get(JOBS, harness.namespace, "sft-trainer")
    cm = harness.kube.get(CONFIGMAPS, harness.namespace, "sft-config")
    children = [job, cm] + [
        harness.kube.get(r, harness.namespace, "sft-trainer") for r in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS)
    ]
    for child in children:
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        # The API server names the operator's client (its User-Agent) as the creator.
        assert "kubetune-operator" in {m["manager"] for m in child["metadata"]["managedFields"]}
        assert child["metadata"]["labels"][names.LABEL_FINETUNEJOB] == "sft"

    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [42, 43, 44, 45]
    pod_spec = spec["template"]["spec"]
    assert pod_spec["serviceAccountName"] == "sft-trainer"
    assert pod_spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod_spec["containers"][0]
    assert container["image"] == "registry.example/kubetune/trainer:test"
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec["volumes"] if "secret" in v}
    assert secrets == {"storage-credentials": "s3", "hub-token": "hf"}

    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.storage.endpoint == "http://s3.local:9000"
    assert (config.reporting.namespace, config.reporting.name) == (harness.namespace, "sft")

    # The Job controller creates the pod; it is the operator's pod template.
    pods = harness.wait_for("the trainer pod", lambda: harness.kubelet.pods("sft"))
    assert [p["spec"]["serviceAccountName"] for p in pods] == ["sft-trainer"]
    # kopf posts events in the background: wait for them.
    harness.wait_for("a Created event", lambda: any(e["reason"] == "Created" for e in harness.events("sft")))


def test_trainer_network_policy_and_own_identity(
    run_operator: Any, harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With KUBETUNE_TRAINER_EGRESS the API server takes each job's NetworkPolicy (strict
    validation), and it selects the trainer pod; an own ServiceAccount is bound, not created."""
    object_store = {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"port": 9000, "protocol": "TCP"}],
    }
    hub = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    monkeypatch.setenv("KUBETUNE_TRAINER_EGRESS", json.dumps({"objectStore": [object_store], "hub": [hub]}))
    with run_operator():
        ftj = harness.create(
            "np", model={"source": "org/model"}, identity={"serviceAccountName": "ml-reader"}
        )
        # The account does not exist yet: held with a reason that says so, no Job (it would get no pod).
        held = harness.wait_for(
            "ServiceAccountMissing",
            lambda: (st := harness.status("np")).get("reason") == "ServiceAccountMissing" and st,
        )
        assert held["phase"] == "Pending"
        assert "identity.serviceAccountName ml-reader does not exist" in held["message"]
        assert harness.kube.get(JOBS, harness.namespace, "np-trainer") is None
        account = {"name": "ml-reader", "namespace": harness.namespace}
        harness.kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": account})
        policy = harness.wait_for(
            "the NetworkPolicy", lambda: harness.kube.get(NETWORKPOLICIES, harness.namespace, "np-trainer")
        )
        assert policy["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
        assert policy["spec"]["egress"] == [object_store, hub]  # a hub model: the hub rule too
        assert harness.kube.get(SERVICEACCOUNTS, harness.namespace, "np-trainer") is None
        binding = harness.kube.get(ROLEBINDINGS, harness.namespace, "np-trainer")
        assert binding["subjects"][0]["name"] == "ml-reader"
        # Retried on the hold's 20 s timer: the Job and its pod follow.
        (pod,) = harness.wait_for("the trainer pod", lambda: harness.kubelet.pods("np"), timeout=90)
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["serviceAccountName"] == "ml-reader"


def test_lifecycle_through_pod_states(operator: Any, harness: Any) -> None:
    harness.create("life")
    pod = harness.kubelet.wait_pod("life")
    status = harness.wait_phase("life", "Pending")

    harness.kubelet.waiting(
        pod, "ImagePullBackOff", 'Back-off pulling image "registry.example/kubetune/trainer:test"'
    )
    harness.wait_phase("life", "Pending", "ImagePullBackOff")

    harness.kubelet.run(pod)
    status = harness.wait_phase("life", "Running")
    assert _conditions(status)["Running"] == "True"
    assert status["startTime"]

    # The trainer reports progress on its own; the operator keeps it and summarizes it.
    progress = {
        "step": 30,
        "totalSteps": 120,
        "epoch": 0.25,
        "loss": 1.875,
        "updateTime": harness.kubelet.now(),
    }
    harness.kube.patch(FINETUNEJOBS, harness.namespace, "life", {"status": {"progress": progress}}, "status")
    harness.wait_for(
        "the progress summary", lambda: harness.status("life").get("progressSummary") == "30/120"
    )
    row = harness.local_env.kubectl("get", "ftj", "life", "-n", harness.namespace, "--no-headers").split()
    assert row[:4] == ["life", "Running", "30/120", "1.875"]

    summary = json.dumps({"adapterUri": "s3://results/run-1/adapter", "trainLoss": 1.5})
    harness.kubelet.terminate(pod, 0, "Completed", summary)
    status = harness.wait_phase("life", "Succeeded")
    assert status["message"] == summary
    assert status["completionTime"]
    assert status["exitCode"] == 0
    assert status["progress"] == progress  # never clobbered by the operator
    assert _conditions(status) == {
        "Created": "True", "Running": "False", "Suspended": "False", "Succeeded": "True", "Failed": "False",
        "Cancelled": "False",
    }  # fmt: skip
    expected = {"Created", "Pending", "Succeeded"}
    harness.wait_for(f"events {expected}", lambda: expected <= {e["reason"] for e in harness.events("life")})
    # The children created with the phase they start in, the warning within Pending, the outcome;
    # no Event for a Normal step within a phase (WaitingForPod -> PodStarting) or for the Normal
    # entry into Running: the status says those (a write less each).
    events = harness.events("life")
    (created,) = [e["message"] for e in events if e["reason"] == "Created"]
    assert created.startswith("created ConfigMap, ServiceAccount, Role, RoleBinding, Job; Pending: ")
    assert [e["type"] for e in events if e["reason"] == "Pending"] == ["Warning"]
    assert not [e for e in events if e["reason"] == "Running"]


def test_oomkilled_is_the_failure_reason(operator: Any, harness: Any) -> None:
    harness.create("oom", lifecycle={"backoffLimit": 0})
    pod = harness.kubelet.wait_pod("oom")
    harness.kubelet.run(pod)
    harness.wait_phase("oom", "Running")
    harness.kubelet.terminate(pod, 137, "OOMKilled")

    status = harness.wait_phase("oom", "Failed")
    assert status["reason"] == "OOMKilled"
    assert status["exitCode"] == 137
    assert status["completionTime"]
    assert _conditions(status)["Failed"] == "True"
    harness.wait_for(
        "a Warning event naming OOMKilled",
        lambda: any(e["type"] == "Warning" and "OOMKilled" in e["message"] for e in harness.events("oom")),
    )


def test_invalid_data_fails_at_once(operator: Any, harness: Any) -> None:
    """The trainer's invalid-data exit code fails the Job despite backoffLimit (podFailurePolicy)."""
    harness.create("baddata", lifecycle={"backoffLimit": 5})
    pod = harness.kubelet.wait_pod("baddata")
    harness.kubelet.run(pod)
    harness.kubelet.terminate(pod, ExitCode.INVALID_DATA, "Error", "record 3: 'messages' is missing")

    status = harness.wait_phase("baddata", "Failed")
    assert status["reason"] == "InvalidDataset"
    assert "record 3" in status["message"]
    assert status["attempts"] == 1
    assert len(harness.kubelet.pods("baddata")) == 1  # no retry


def test_suspend_and_resume(operator: Any, harness: Any) -> None:
    harness.create("pause")
    pod = harness.kubelet.wait_pod("pause")
    harness.kubelet.run(pod)
    harness.wait_phase("pause", "Running")

    harness.kube.patch(FINETUNEJOBS, harness.namespace, "pause", {"spec": {"suspend": True}})
    status = harness.wait_phase("pause", "Suspended", "Suspended")
    assert _conditions(status)["Suspended"] == "True"
    assert harness.kube.get(JOBS, harness.namespace, "pause-trainer")["spec"]["suspend"] is True
    harness.wait_for(
        "the pod to be gone",
        lambda: (
            not [p for p in harness.kubelet.pods("pause") if p["metadata"]["name"] == pod["metadata"]["name"]]
        ),
    )

    harness.kube.patch(FINETUNEJOBS, harness.namespace, "pause", {"spec": {"suspend": False}})
    new_pod = harness.kubelet.wait_pod("pause")
    assert new_pod["metadata"]["name"] != pod["metadata"]["name"]
    harness.kubelet.run(new_pod)
    status = harness.wait_phase("pause", "Running")
    assert _conditions(status)["Suspended"] == "False"


def test_lifecycle_edits_reach_the_job(operator: Any, harness: Any) -> None:
    harness.create("limits", suspend=True)
    harness.wait_phase("limits", "Suspended")
    patch = {
        "spec": {
            "lifecycle": {"backoffLimit": 7, "activeDeadlineSeconds": 900, "ttlSecondsAfterFinished": 60}
        }
    }
    harness.kube.patch(FINETUNEJOBS, harness.namespace, "limits", patch)

    def aligned() -> bool:
        spec = harness.kube.get(JOBS, harness.namespace, "limits-trainer")["spec"]
        return bool(
            (spec["backoffLimit"], spec.get("activeDeadlineSeconds"), spec.get("ttlSecondsAfterFinished"))
            == (7, 900, 60)
        )

    harness.wait_for("the Job to follow spec.lifecycle", aligned)


def test_queue_name_creates_a_suspended_job_for_kueue(operator: Any, harness: Any) -> None:
    harness.create("queued", scheduling={"queueName": "team-a"})
    status = harness.wait_phase("queued", "Queued", "WaitingForAdmission")
    assert _conditions(status)["Suspended"] == "True"
    job = harness.kube.get(JOBS, harness.namespace, "queued-trainer")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_delete_removes_every_child_even_without_the_operator(run_operator: Any, harness: Any) -> None:
    with run_operator():
        harness.create("gone")
        harness.wait_phase("gone", "Pending")
    ftj = harness.kube.get(FINETUNEJOBS, harness.namespace, "gone")
    assert not ftj["metadata"].get("finalizers")

    # The operator is stopped: deletion must not wait for it.
    harness.kube.delete(FINETUNEJOBS, harness.namespace, "gone")
    harness.wait_for(
        "the FineTuneJob to be deleted",
        lambda: harness.kube.get(FINETUNEJOBS, harness.namespace, "gone") is None,
        timeout=10,
    )

    def children_gone() -> bool:
        names_ = [("gone-trainer", JOBS), ("gone-config", CONFIGMAPS), ("gone-trainer", SERVICEACCOUNTS),
                  ("gone-trainer", ROLES), ("gone-trainer", ROLEBINDINGS)]  # fmt: skip
        return all(harness.kube.get(resource, harness.namespace, name) is None for name, resource in names_)

    harness.wait_for("the garbage collector to delete every child", children_gone, timeout=60)


def test_restart_adopts_and_never_duplicates_the_job(run_operator: Any, harness: Any) -> None:
    from kubetune_operator import builders

    # A crash right after creating the Job, before any status was written: the children exist,
    # the FineTuneJob's status does not know about them yet.
    ftj = harness.create("restart")
    for obj in builders.children(ftj, "registry.example/kubetune/trainer:test"):
        harness.kube.create(obj)
    job_uid = harness.kube.get(JOBS, harness.namespace, "restart-trainer")["metadata"]["uid"]

    with run_operator():
        harness.wait_phase("restart", "Pending")
        pod = harness.kubelet.wait_pod("restart")
    harness.kubelet.run(pod)  # the pod starts while no operator is running
    with run_operator():
        harness.wait_phase("restart", "Running")
    with run_operator():
        harness.wait_phase("restart", "Running")
        harness.kubelet.terminate(pod, 0, "Completed")
        harness.wait_phase("restart", "Succeeded")

    jobs = harness.kube.list(JOBS, harness.namespace, "kubetune.dev/finetunejob=restart")
    assert [j["metadata"]["uid"] for j in jobs] == [job_uid]
    created = [e for e in harness.events("restart") if e["reason"] == "Created"]
    assert not created  # nothing was missing, so nothing was created


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_metrics_endpoint(run_operator: Any, harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_port = _free_port()
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", str(metrics_port))
    monkeypatch.setenv("KUBETUNE_BIND_ADDRESS", "127.0.0.1")
    with run_operator():
        harness.create("measured", suspend=True)
        harness.wait_phase("measured", "Suspended")

        def scrape() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
                text: str = resp.read().decode()
            wanted = (
                'kubetune_finetunejobs{phase="Suspended"} 1.0',
                'kubetune_reconcile_duration_seconds_count{trigger="finetunejob"}',
                # The echo of the operator's own (last) status patch asks for no sync.
                'kubetune_reconcile_skipped_total{trigger="finetunejob"}',
            )
            return text if all(line in text for line in wanted) else None

        text = harness.wait_for("the phase gauge", scrape)
    assert 'kubetune_reconcile_total{trigger="finetunejob"}' in text
    assert 'kubetune_phase_transitions_total{phase="Suspended"}' in text
    assert "kubetune_reconcile_errors_total" in text


def test_names_held_by_another_owner_delay_the_job(operator: Any, harness: Any) -> None:
    """E.g. ``kubectl replace --force``: the old FineTuneJob's children are still being collected."""
    owner = harness.get(SERVICEACCOUNTS, "default") or harness.wait_for(
        "the default ServiceAccount", lambda: harness.get(SERVICEACCOUNTS, "default")
    )
    held = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "held-config",
            "namespace": harness.namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "name": "default",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
        "data": {"config.json": "{}"},
    }
    harness.kube.create(held)
    harness.create("held")
    status = harness.wait_phase("held", "Pending", "WaitingForCleanup")
    assert "ConfigMap held-config" in status["message"]
    assert harness.get(JOBS, "held-trainer") is None  # it would mount the other owner's config

    harness.kube.delete(CONFIGMAPS, harness.namespace, "held-config")
    harness.wait_for("the Job", lambda: harness.get(JOBS, "held-trainer"), timeout=60)
    config_map = harness.get(CONFIGMAPS, "held-config")
    assert config_map is not None
    assert config_map["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    harness.wait_for(
        "the Created condition", lambda: _conditions(harness.status("held")).get("Created") == "True"
    )


def test_a_typo_in_a_passed_through_field_is_refused_and_named(operator: Any, harness: Any) -> None:
    """Children are posted with strict field validation: the pod would otherwise run without it."""
    affinity: Obj = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecutoin": {"nodeSelectorTerms": []}}
    }
    harness.create("typo", scheduling={"affinity": affinity})
    status = harness.wait_phase("typo", "Pending", "CreateRefused")
    assert "requiredDuringSchedulingIgnoredDuringExecutoin" in status["message"]
    assert harness.get(JOBS, "typo-trainer") is None
    harness.wait_for(
        "a Warning event naming the refusal",
        lambda: any(
            e["type"] == "Warning" and "CreateRefused" in e["message"] for e in harness.events("typo")
        ),
    )


def test_a_quota_refusal_waits_and_the_job_starts_once_it_is_lifted(operator: Any, harness: Any) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs", "namespace": harness.namespace},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    harness.kube.request("POST", f"/api/v1/namespaces/{harness.namespace}/resourcequotas", quota)
    harness.create("quota")
    status = harness.wait_phase("quota", "Pending", "CreateRefused")
    assert "exceeded quota" in status["message"]
    harness.kube.request("DELETE", f"/api/v1/namespaces/{harness.namespace}/resourcequotas/no-jobs")
    harness.wait_for("the Job", lambda: harness.get(JOBS, "quota-trainer"), timeout=60)
    harness.wait_for(
        "the Created condition", lambda: _conditions(harness.status("quota")).get("Created") == "True"
    )
    assert harness.status("quota")["reason"] != "CreateRefused"


def _jobs_of(harness: Any, name: str) -> list[Obj]:
    found: list[Obj] = harness.kube.list(JOBS, harness.namespace, f"kubetune.dev/finetunejob={name}")
    return found


def test_cancel_mid_run_deletes_the_job_and_keeps_the_finetunejob(operator: Any, harness: Any) -> None:
    """spec.cancel on a running job: the Job and its pod go (foreground: the pod first), the
    FineTuneJob and its status stay, phase Cancelled; nothing brings it back, and the API server
    refuses to un-cancel it. With a TTL, the Job carries the outcome finalizer: it must not block."""
    from kubetune_operator.kube import KubeError

    harness.create("stop", lifecycle={"ttlSecondsAfterFinished": 600})
    pod = harness.kubelet.wait_pod("stop")
    harness.kubelet.run(pod)
    harness.wait_phase("stop", "Running")
    job = harness.get(JOBS, "stop-trainer")
    assert "kubetune.dev/outcome" in job["metadata"]["finalizers"]
    progress = {"step": 40, "totalSteps": 100, "lastCheckpoint": "s3://results/run-1/checkpoints/step-40"}
    harness.patch_ftj("stop", {"status": {"progress": progress}}, "status")

    harness.patch_ftj("stop", {"spec": {"cancel": True}})
    status = harness.wait_phase("stop", "Cancelled", "Cancelled", timeout=60)
    assert harness.get(JOBS, "stop-trainer") is None
    assert harness.kubelet.pods("stop") == []
    assert status["progress"] == progress  # the trainer's report, and so its last checkpoint, kept
    assert status["outputURI"] == "s3://results/run-1"
    assert status["completionTime"]
    assert status["startTime"]
    assert "create a new FineTuneJob" in status["message"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Cancelled"] == ("True", "Cancelled")
    assert conditions["Running"] == ("False", "Finished")
    assert harness.get(CONFIGMAPS, "stop-config") is not None  # the FineTuneJob's other children stay
    harness.wait_for(
        "a Normal Cancelled event",
        lambda: any(e["reason"] == "Cancelled" and e["type"] == "Normal" for e in harness.events("stop")),
    )

    # spec.suspend: true then false (a resume) does nothing; the operator has seen both edits.
    harness.patch_ftj("stop", {"spec": {"suspend": True}})
    harness.patch_ftj("stop", {"spec": {"suspend": False}})
    generation = harness.get(FINETUNEJOBS, "stop")["metadata"]["generation"]
    status = harness.wait_for(
        "the operator to observe the resume",
        lambda: (st := harness.status("stop")).get("observedGeneration") == generation and st,
    )
    assert (status["phase"], status["reason"]) == ("Cancelled", "Cancelled")
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert "spec.suspend has no effect" in suspended["message"]
    assert _jobs_of(harness, "stop") == []

    with pytest.raises(KubeError) as refused:
        harness.patch_ftj("stop", {"spec": {"cancel": False}})
    assert refused.value.status == 422
    assert "spec.cancel" in refused.value.message
    assert "create a new FineTuneJob" in refused.value.message
    with pytest.raises(KubeError):  # a null is the default, false: refused the same way
        harness.patch_ftj("stop", {"spec": {"cancel": None}})
    assert harness.get(FINETUNEJOBS, "stop")["spec"]["cancel"] is True


def test_cancel_after_success_keeps_succeeded(operator: Any, harness: Any) -> None:
    harness.create("done")
    pod = harness.kubelet.wait_pod("done")
    harness.kubelet.run(pod)
    harness.kubelet.terminate(pod, 0, "Completed", '{"trainLoss": 1.0}')
    succeeded = harness.wait_phase("done", "Succeeded")
    job_uid = harness.get(JOBS, "done-trainer")["metadata"]["uid"]

    harness.patch_ftj("done", {"spec": {"cancel": True}})
    generation = harness.get(FINETUNEJOBS, "done")["metadata"]["generation"]
    status = harness.wait_for(
        "the operator to observe the cancel",
        lambda: (st := harness.status("done")).get("observedGeneration") == generation and st,
    )
    assert (status["phase"], status["reason"], status["message"]) == (
        "Succeeded",
        "Completed",
        succeeded["message"],
    )
    assert status["completionTime"] == succeeded["completionTime"]
    cancelled = next(c for c in status["conditions"] if c["type"] == "Cancelled")
    assert (cancelled["status"], cancelled["reason"]) == ("False", "NotCancelled")
    assert "phase Succeeded is kept" in cancelled["message"]
    job = harness.get(JOBS, "done-trainer")  # left alone: its pod and log are the user's to read
    assert job is not None
    assert job["metadata"]["uid"] == job_uid
    assert not job["metadata"].get("deletionTimestamp")


def test_a_job_created_cancelled_never_gets_a_trainer(operator: Any, harness: Any) -> None:
    harness.create("never", cancel=True)
    status = harness.wait_phase("never", "Cancelled", "Cancelled")
    created = next(c for c in status["conditions"] if c["type"] == "Created")
    assert created["status"] == "False"
    assert _jobs_of(harness, "never") == []
    assert harness.get(CONFIGMAPS, "never-config") is None
