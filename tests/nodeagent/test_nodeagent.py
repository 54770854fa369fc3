"""The node agent runs real pods against the real API server and kube-controller-manager.

One agent per module registers a tainted test node; every pod here is pinned to
it (nodeSelector + toleration), so the agent never runs other tests' pods.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv.agents import pod_log_path, start_agent
from kubetune_localenv.cluster import LocalEnv, ManagedProcess
from kubetune_localenv.stack import wait_for
from kubetune_nodeagent.cgroup import MemoryCgroups
from kubetune_operator.kube import Kube, KubeError

pytestmark = pytest.mark.cluster

JSON = dict[str, Any]
TAINT = {"key": "kubetune.dev/nodeagent-test", "value": "true", "effect": "NoSchedule"}
TAINT_ARG = f"--taint={TAINT['key']}={TAINT['value']}:{TAINT['effect']}"
BUSYBOX = "busybox:1.36"
TRAINER = "ghcr.io/kubetune/trainer:dev"
# Mount points under one host directory (see docs/nodeagent.md: they are created on the host).
MNT = "/tmp/kubetune-nodeagent-test"


# -- helpers ----------------------------------------------------------------------------
@dataclass
class Node:
    """A running node agent and how to address pods to it."""

    name: str
    process: ManagedProcess
    env: LocalEnv

    def pin(self, spec: JSON) -> JSON:
        """``spec`` with the nodeSelector and toleration that land it on this node."""
        spec.setdefault("nodeSelector", {})["kubernetes.io/hostname"] = self.name
        spec.setdefault("tolerations", []).append({**TAINT, "operator": "Equal"})
        return spec

    def log(self, namespace: str, pod: str, container: str) -> str:
        return pod_log_path(self.env, namespace, pod, container, node_name=self.name).read_text()


def delete_node(kube: Kube, name: str) -> None:
    try:
        kube.request("DELETE", f"/api/v1/nodes/{name}")
    except KubeError as exc:
        if exc.status != 404:
            raise


def create(kube: Kube, namespace: str, collection: str, body: JSON, group: str = "/api/v1") -> JSON:
    return kube.request("POST", f"{group}/namespaces/{namespace}/{collection}", body)


def create_pod(kube: Kube, namespace: str, name: str, spec: JSON) -> JSON:
    return create(
        kube, namespace, "pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    )


def get_pod(kube: Kube, namespace: str, name: str) -> JSON | None:
    try:
        return kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def wait_pod(kube: Kube, namespace: str, name: str, check: Callable[[JSON], bool], what: str) -> JSON:
    def probe() -> JSON | None:
        pod = get_pod(kube, namespace, name)
        return pod if pod is not None and check(pod) else None

    result: JSON = wait_for(f"pod {name}: {what}", probe)
    return result


def wait_phase(kube: Kube, namespace: str, name: str, *phases: str) -> JSON:
    return wait_pod(
        kube, namespace, name, lambda p: p.get("status", {}).get("phase") in phases, f"phase {phases}"
    )


def container_status(pod: JSON, name: str) -> JSON:
    statuses: list[JSON] = pod["status"].get("containerStatuses") or []
    return next(s for s in statuses if s["name"] == name)


def condition(pod: JSON, kind: str) -> JSON | None:
    conditions: list[JSON] = pod["status"].get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def shell(name: str, script: str, **extra: Any) -> JSON:
    return {"name": name, "image": BUSYBOX, "command": ["sh", "-c", textwrap.dedent(script)], **extra}


def processes_with(token: str) -> list[int]:
    """PIDs whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry.name))
    return found


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kube(local_env: LocalEnv) -> Kube:
    return Kube.connect(local_env.kubeconfig)


@pytest.fixture(scope="module")
def node(local_env: LocalEnv, kube: Kube) -> Iterator[Node]:
    name = "nodeagent-test-" + secrets.token_hex(3)
    proc = start_agent(local_env, node_name=name, gpus=1, extra_args=[TAINT_ARG, "--restart-backoff=1"])
    try:
        yield Node(name, proc, local_env)
    finally:
        proc.stop()
        delete_node(kube, name)


# -- tests ------------------------------------------------------------------------------
def test_node_is_ready_with_gpus_and_lease(kube: Kube, node: Node) -> None:
    obj = kube.request("GET", f"/api/v1/nodes/{node.name}")
    assert obj["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert obj["metadata"]["labels"]["kubernetes.io/hostname"] == node.name
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    lease = kube.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node.name}")
    assert lease["spec"]["holderIdentity"] == node.name


def test_volumes_env_and_termination_message(kube: Kube, node: Node, namespace: str) -> None:
    create(
        kube,
        namespace,
        "configmaps",
        {"metadata": {"name": "cfg"}, "data": {"greeting": "hello", "other": "x"}},
    )
    create(kube, namespace, "secrets", {"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}})
    script = """
        set -eu
        test "$(cat $MNT/config/greeting.txt)" = hello
        test "$(stat -c %a $MNT/config/greeting.txt)" = 600
        test ! -e $MNT/config/other
        if touch $MNT/config/new 2>/dev/null; then echo "config volume is writable"; exit 1; fi
        echo scratch > $MNT/scratch/file && test "$(cat $MNT/scratch/file)" = scratch
        test "$PASSWORD" = s3cr3t
        test "${MISSING-unset}" = unset
        test "$CFG_greeting" = hello
        echo "pod=$POD_NAME ns=$POD_NAMESPACE node=$NODE_NAME sa=$SA ip=$POD_IP derived=$DERIVED"
        test "$(pwd)" = $MNT/work
        test -d "$HOME" && echo home > "$HOME/file"
        test ! -e /tmp/kubetune-nodeagent-host-marker  # /tmp is the pod's emptyDir, not the host's
        echo shm > /dev/shm/file
        echo "all checks passed" > /dev/termination-log
    """
    spec = node.pin(
        {
            "restartPolicy": "Never",
            "containers": [
                shell(
                    "main",
                    script,
                    workingDir=f"{MNT}/work",
                    env=[
                        {"name": "MNT", "value": MNT},
                        {
                            "name": "PASSWORD",
                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
                        },
                        {
                            "name": "MISSING",
                            "valueFrom": {
                                "configMapKeyRef": {"name": "cfg", "key": "nope", "optional": True}
                            },
                        },
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "DERIVED", "value": "$(POD_NAME)-suffix"},
                    ],
                    envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                    volumeMounts=[
                        # Like the operator's trainer pod: emptyDirs over /tmp (where the test
                        # agent keeps its state, so volume sources must not be hidden) and /dev/shm.
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "shm", "mountPath": "/dev/shm"},
                        {"name": "config", "mountPath": f"{MNT}/config"},
                        {"name": "scratch", "mountPath": f"{MNT}/scratch"},
                    ],
                )
            ],
            "volumes": [
                {
                    "name": "config",
                    "configMap": {
                        "name": "cfg",
                        "items": [{"key": "greeting", "path": "greeting.txt", "mode": 0o600}],
                    },
                },
                {"name": "scratch", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        }
    )
    host_marker = Path("/tmp/kubetune-nodeagent-host-marker")
    host_marker.touch()
    try:
        create_pod(kube, namespace, "volumes", spec)
        pod = wait_phase(kube, namespace, "volumes", "Succeeded", "Failed")
    finally:
        host_marker.unlink()
    log = node.log(namespace, "volumes", "main")
    assert pod["status"]["phase"] == "Succeeded", log
    assert pod["spec"]["nodeName"] == node.name
    terminated = container_status(pod, "main")["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "all checks passed\n"
    assert (
        f"pod=volumes ns={namespace} node={node.name} sa=default ip=127.0.0.1 derived=volumes-suffix" in log
    )
    for kind in ("PodScheduled", "Initialized"):
        cond = condition(pod, kind)
        assert cond is not None
        assert cond["status"] == "True"
    ready = condition(pod, "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "PodCompleted"


def test_in_cluster_config_with_projected_token(kube: Kube, node: Node, namespace: str) -> None:
    create(kube, namespace, "serviceaccounts", {"metadata": {"name": "reader"}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    create(kube, namespace, "roles", {"metadata": {"name": "pod-reader"}, "rules": [rule]}, rbac)
    binding = {
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    create(kube, namespace, "rolebindings", binding, rbac)
    script = """
        import os
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        config.load_incluster_config()
        api = client.CoreV1Api()
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        me = api.read_namespaced_pod(os.environ["POD_NAME"], ns)
        try:
            api.list_namespaced_secret(ns)
            verdict = "secrets readable"
        except ApiException as exc:
            verdict = f"secrets {exc.status}"
        sa = me.spec.service_account_name
        message = f"read {me.metadata.name} on {me.spec.node_name} as {sa}; {verdict}"
        print(message)
        with open("/dev/termination-log", "w") as f:
            f.write(message)
    """
    spec = node.pin(
        {
            "restartPolicy": "Never",
            "serviceAccountName": "reader",
            "containers": [
                {
                    "name": "python",
                    "image": TRAINER,
                    "command": ["python", "-c", textwrap.dedent(script)],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                }
            ],
        }
    )
    created = create_pod(kube, namespace, "incluster", spec)
    # The ServiceAccount admission plugin added the projected token volume; nothing test-specific.
    mounts = created["spec"]["containers"][0]["volumeMounts"]
    assert mounts[0]["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    pod = wait_phase(kube, namespace, "incluster", "Succeeded", "Failed")
    log = node.log(namespace, "incluster", "python")
    assert pod["status"]["phase"] == "Succeeded", log
    message = container_status(pod, "python")["state"]["terminated"]["message"]
    assert message == f"read incluster on {node.name} as reader; secrets 403"


def test_failure_exit_code_and_messages(kube: Kube, node: Node, namespace: str) -> None:
    spec = node.pin(
        {
            "restartPolicy": "Never",
            "containers": [
                shell("file", "echo 'disk on fire' > /dev/termination-log; exit 3"),
                shell(
                    "custom-path",
                    "echo 'custom path works' > /tmp/kubetune-nodeagent-test-msg; exit 0",
                    terminationMessagePath="/tmp/kubetune-nodeagent-test-msg",
                ),
                shell(
                    "logs",
                    "echo first line; echo 'oops from the logs' >&2; exit 4",
                    terminationMessagePolicy="FallbackToLogsOnError",
                ),
                shell("nonexistent", "", command=["/no/such/binary"]),
            ],
        }
    )
    create_pod(kube, namespace, "failing", spec)
    pod = wait_phase(kube, namespace, "failing", "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Failed"
    file_state = container_status(pod, "file")["state"]["terminated"]
    assert (file_state["exitCode"], file_state["reason"], file_state["message"]) == (
        3,
        "Error",
        "disk on fire\n",
    )
    custom = container_status(pod, "custom-path")["state"]["terminated"]
    assert (custom["exitCode"], custom["message"]) == (0, "custom path works\n")
    logs_state = container_status(pod, "logs")["state"]["terminated"]
    assert logs_state["exitCode"] == 4
    assert logs_state["message"] == "first line\noops from the logs\n"
    start_error = container_status(pod, "nonexistent")["state"]["terminated"]
    assert (start_error["exitCode"], start_error["reason"]) == (128, "StartError")
    assert "/no/such/binary" in start_error["message"]


def test_init_containers_run_in_order_before_the_containers(kube: Kube, node: Node, namespace: str) -> None:
    mounts = [{"name": "data", "mountPath": f"{MNT}/init"}]

    def pod_spec(second_init: str) -> JSON:
        return node.pin(
            {
                "restartPolicy": "Never",
                "initContainers": [
                    shell("one", f"sleep 0.5; echo one >> {MNT}/init/order", volumeMounts=mounts),
                    shell("two", second_init, volumeMounts=mounts),
                ],
                "containers": [shell("main", f"cat {MNT}/init/order", volumeMounts=mounts)],
                "volumes": [{"name": "data", "emptyDir": {}}],
            }
        )

    create_pod(kube, namespace, "inits", pod_spec(f"echo two >> {MNT}/init/order"))
    create_pod(kube, namespace, "bad-init", pod_spec("exit 7"))
    pod = wait_phase(kube, namespace, "inits", "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Succeeded"
    assert node.log(namespace, "inits", "main") == "one\ntwo\n"
    inits = pod["status"]["initContainerStatuses"]
    assert [s["state"]["terminated"]["reason"] for s in inits] == ["Completed", "Completed"]

    bad = wait_phase(kube, namespace, "bad-init", "Succeeded", "Failed")
    assert bad["status"]["phase"] == "Failed"
    second = next(s for s in bad["status"]["initContainerStatuses"] if s["name"] == "two")
    assert second["state"]["terminated"]["exitCode"] == 7
    assert "waiting" in container_status(bad, "main")["state"]  # never started


def test_job_runs_to_completion_with_restart_in_place(kube: Kube, node: Node, namespace: str) -> None:
    # Fails once (restartPolicy OnFailure restarts it in the same pod), then succeeds.
    script = f"""
        if [ -e {MNT}/job/attempted ]; then echo second attempt; exit 0; fi
        touch {MNT}/job/attempted; echo first attempt; exit 1
    """
    template = {
        "spec": node.pin(
            {
                "restartPolicy": "OnFailure",
                "containers": [
                    shell("work", script, volumeMounts=[{"name": "data", "mountPath": f"{MNT}/job"}])
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
            }
        )
    }
    job = {"metadata": {"name": "once"}, "spec": {"backoffLimit": 3, "template": template}}
    create(kube, namespace, "jobs", job, "/apis/batch/v1")

    def complete() -> JSON | None:
        obj = kube.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/once")
        done = [c for c in obj.get("status", {}).get("conditions") or [] if c["status"] == "True"]
        return obj if any(c["type"] in ("Complete", "Failed") for c in done) else None

    obj = wait_for("job once to finish", complete, timeout=90)
    assert obj["status"].get("succeeded") == 1, obj["status"]
    pods = kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": "job-name=once"}
    )["items"]
    assert len(pods) == 1
    status = container_status(pods[0], "work")
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert pods[0]["status"]["phase"] == "Succeeded"
    log = node.log(namespace, pods[0]["metadata"]["name"], "work")
    assert log == "first attempt\nsecond attempt\n"


def test_memory_limit_is_enforced_and_reported_as_oomkilled(kube: Kube, node: Node, namespace: str) -> None:
    if MemoryCgroups.detect(f"kubetune-nodeagent-{node.name}") is None:
        pytest.skip(
            "this host gives the agent no memory cgroups: limits are not enforced (docs/nodeagent.md)"
        )
    hog = {
        "name": "hog",
        "image": "python:3.11",
        "command": ["python3", "-c", "data = bytearray(1024 * 1024 * 1024); print('survived')"],
        "resources": {"limits": {"memory": "64Mi"}},
    }
    small = shell("small", "echo fits", resources={"limits": {"memory": "64Mi"}})
    create_pod(kube, namespace, "hog", node.pin({"restartPolicy": "Never", "containers": [hog, small]}))
    pod = wait_phase(kube, namespace, "hog", "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Failed"
    killed = container_status(pod, "hog")["state"]["terminated"]
    assert (killed["exitCode"], killed["reason"]) == (137, "OOMKilled")
    assert "survived" not in node.log(namespace, "hog", "hog")
    assert container_status(pod, "small")["state"]["terminated"]["reason"] == "Completed"


def test_delete_sends_sigterm_and_honours_grace(
    kube: Kube, node: Node, namespace: str, tmp_path: Path
) -> None:
    tmp_path.chmod(0o777)
    graceful = f"""
        trap 'echo term >> {MNT}/marker/graceful; sleep 2; echo done >> {MNT}/marker/graceful; exit 0' TERM
        echo started > {MNT}/marker/graceful
        while true; do sleep 0.1; done
    """
    stubborn = f"""
        trap 'echo ignored >> {MNT}/marker/stubborn' TERM
        echo started > {MNT}/marker/stubborn
        while true; do sleep 0.1; done
    """
    mounts = [{"name": "marker", "mountPath": f"{MNT}/marker"}]
    spec = node.pin(
        {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 4,
            "containers": [
                shell("graceful", graceful, volumeMounts=mounts),
                shell("stubborn", stubborn, volumeMounts=mounts),
            ],
            "volumes": [{"name": "marker", "hostPath": {"path": str(tmp_path)}}],
        }
    )
    create_pod(kube, namespace, "victim", spec)
    wait_phase(kube, namespace, "victim", "Running")
    wait_for(
        "both containers to start",
        lambda: (tmp_path / "graceful").exists() and (tmp_path / "stubborn").exists(),
    )
    started = time.monotonic()
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/victim")  # default: the pod's grace (4s)
    wait_for("pod object to be gone", lambda: get_pod(kube, namespace, "victim") is None, timeout=30)
    elapsed = time.monotonic() - started
    assert (tmp_path / "graceful").read_text() == "started\nterm\ndone\n"
    assert (tmp_path / "stubborn").read_text() == "started\nignored\n"
    assert 4 <= elapsed < 15, elapsed  # the stubborn one was SIGKILLed after the grace period


def test_unknown_image_waits_with_image_pull_error(kube: Kube, node: Node, namespace: str) -> None:
    spec = node.pin({"containers": [{"name": "c", "image": "registry.invalid/nope:1", "command": ["true"]}]})
    create_pod(kube, namespace, "unpullable", spec)

    def waiting_reason(pod: JSON) -> bool:
        statuses = pod.get("status", {}).get("containerStatuses") or []
        return bool(statuses) and statuses[0]["state"].get("waiting", {}).get("reason") == "ImagePullBackOff"

    pod = wait_pod(kube, namespace, "unpullable", waiting_reason, "ImagePullBackOff")
    waiting = container_status(pod, "c")["state"]["waiting"]
    assert "registry.invalid/nope" in waiting["message"]
    assert pod["status"]["phase"] == "Pending"
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/unpullable")
    wait_for("pod object to be gone", lambda: get_pod(kube, namespace, "unpullable") is None, timeout=20)


def test_scheduling_respects_gpus_and_taints(kube: Kube, node: Node, namespace: str) -> None:
    def gpu_pod(count: int) -> JSON:
        container = shell("c", "exit 0", resources={"limits": {"nvidia.com/gpu": str(count)}})
        return node.pin({"restartPolicy": "Never", "containers": [container]})

    create_pod(kube, namespace, "too-many-gpus", gpu_pod(2))
    create_pod(kube, namespace, "one-gpu", gpu_pod(1))
    untolerated: JSON = {
        "restartPolicy": "Never",
        "containers": [shell("c", "exit 0")],
        "nodeSelector": {"kubernetes.io/hostname": node.name},
    }
    create_pod(kube, namespace, "untolerated", untolerated)

    def unschedulable(pod: JSON) -> bool:
        cond = condition(pod, "PodScheduled")
        return cond is not None and cond["status"] == "False"

    pod = wait_pod(kube, namespace, "too-many-gpus", unschedulable, "Unschedulable")
    scheduled = condition(pod, "PodScheduled")
    assert scheduled is not None
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    pod = wait_pod(kube, namespace, "untolerated", unschedulable, "Unschedulable")
    scheduled = condition(pod, "PodScheduled")
    assert scheduled is not None
    assert "untolerated taint" in scheduled["message"]
    assert wait_phase(kube, namespace, "one-gpu", "Succeeded")["spec"]["nodeName"] == node.name


def test_agent_stop_and_kill_leave_no_processes(local_env: LocalEnv, kube: Kube, namespace: str) -> None:
    name = "nodeagent-kill-" + secrets.token_hex(3)
    token = str(4_000_000 + secrets.randbelow(1_000_000))
    spec = {
        "nodeName": name,  # assigned directly: the agent runs it without scheduling
        "restartPolicy": "Never",
        "containers": [shell("c", f"sleep {token}1 & sleep {token}2; wait")],
    }
    try:
        # SIGTERM: the agent stops its pods first and reports them Failed (node shutdown).
        agent = start_agent(local_env, node_name=name, extra_args=[TAINT_ARG, "--no-bind"])
        create_pod(kube, namespace, "stopped", spec)
        wait_for("container processes", lambda: len(processes_with(token)) >= 3)
        agent.stop()
        assert processes_with(token) == []
        pod = wait_phase(kube, namespace, "stopped", "Failed")
        assert pod["status"]["reason"] == "Terminated"

        # SIGKILL: the kernel takes the container processes down with the agent.
        agent = start_agent(local_env, node_name=name, extra_args=[TAINT_ARG, "--no-bind"])
        create_pod(kube, namespace, "killed", spec)
        wait_for("container processes", lambda: len(processes_with(token)) >= 3)
        assert agent.popen is not None
        os.kill(agent.popen.pid, signal.SIGKILL)
        agent.popen.wait()
        wait_for("container processes to die with the agent", lambda: processes_with(token) == [], timeout=10)

        # A restarted agent cannot adopt what the killed one ran: it reports the pod lost.
        agent = start_agent(local_env, node_name=name, extra_args=[TAINT_ARG, "--no-bind"])
        pod = wait_phase(kube, namespace, "killed", "Failed")
        lost = container_status(pod, "c")["state"]["terminated"]
        assert (lost["exitCode"], lost["reason"]) == (137, "ContainerStatusUnknown")
        agent.stop()
    finally:
        for pod_name in ("stopped", "killed"):
            try:
                body = {"gracePeriodSeconds": 0}
                kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod_name}", body)
            except KubeError:
                pass
        delete_node(kube, name)
        cgroups = MemoryCgroups.detect(f"kubetune-nodeagent-{name}")
        if cgroups is not None:
            cgroups.close()  # the SIGKILLed agent could not remove its (empty) cgroup folder


def test_image_files_stay_visible_under_a_volume_over_their_parent(
    local_env: LocalEnv, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """A checkout under /tmp (as CI may have) stays visible to a pod with an emptyDir at /tmp."""
    image_dir = Path(tempfile.mkdtemp(prefix="kubetune-image-", dir="/tmp"))
    tool = image_dir / "bin" / "image-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho from-the-image\n")
    tool.chmod(0o755)
    table = tmp_path / "images.yaml"
    rule = {"match": "example.com/kept", "path": [str(tool.parent)], "keep": [str(image_dir)]}
    table.write_text(yaml.safe_dump({"images": [rule]}))
    name = "nodeagent-keep-" + secrets.token_hex(3)
    proc = start_agent(local_env, node_name=name, gpus=0, image_map=table, extra_args=[TAINT_ARG])
    node = Node(name, proc, local_env)
    try:
        probe_write = f"if touch {image_dir}/written 2>/dev/null; then echo writable; else echo read-only; fi"
        script = f"image-tool && {probe_write}"
        spec = node.pin(
            {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "c",
                        "image": "example.com/kept:1",
                        "command": ["sh", "-c", script],
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
            }
        )
        create_pod(kube, namespace, "kept", spec)
        pod = wait_phase(kube, namespace, "kept", "Succeeded", "Failed")
        log = node.log(namespace, "kept", "c")
        assert pod["status"]["phase"] == "Succeeded", log
        assert log.split() == ["from-the-image", "read-only"]
        assert not (image_dir / "written").exists()
    finally:
        proc.stop()
        delete_node(kube, name)
        shutil.rmtree(image_dir)
