"""Pods from the real images under crun, through a node agent in OCI mode, with the trainer's profile.

The profile is the operator's trainer pod's (operator/kubetune_operator/builders.py): non-root
65532, fsGroup, seccomp RuntimeDefault, read-only root, every capability dropped, no privilege
escalation, emptyDirs at /tmp and /dev/shm. A write outside the volumes fails as on a real node
(EROFS), and the same pod without readOnlyRootFilesystem succeeds, so the check can fail.
"""

from __future__ import annotations

import secrets
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubetune_localenv.agents import pod_log_path, start_agent
from kubetune_localenv.cluster import LocalEnv, ManagedProcess
from kubetune_localenv.stack import wait_for
from kubetune_operator.kube import Kube, KubeError

from .conftest import OPERATOR_IMAGE, TRAINER_IMAGE, image_store_dir

pytestmark = [pytest.mark.images, pytest.mark.cluster, pytest.mark.timeout(300)]

JSON = dict[str, Any]
TAINT = {"key": "kubetune.dev/oci-test", "value": "true", "effect": "NoSchedule"}
UID = 65532
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "fsGroup": UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


class Node:
    """The OCI-mode agent's node, and how to run a pod on it."""

    def __init__(self, name: str, process: ManagedProcess, env: LocalEnv) -> None:
        self.name, self.process, self.env = name, process, env
        self.kube = Kube.connect(env.kubeconfig)

    def log(self, namespace: str, pod: str) -> str:
        return pod_log_path(self.env, namespace, pod, "main", node_name=self.name).read_text()

    def run(self, namespace: str, spec: JSON, *, name: str = "") -> str:
        name = name or "p-" + secrets.token_hex(3)
        spec.setdefault("nodeSelector", {})["kubernetes.io/hostname"] = self.name
        spec.setdefault("tolerations", []).append({**TAINT, "operator": "Equal"})
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
        self.kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)
        return name

    def wait(self, namespace: str, name: str, check: Callable[[JSON], bool], what: str) -> JSON:
        def probe() -> JSON | None:
            try:
                pod = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
            except KubeError:
                return None
            return pod if check(pod) else None

        found: JSON = wait_for(f"pod {name}: {what}", probe, timeout=120)
        return found

    def finished(self, namespace: str, name: str) -> JSON:
        pod = self.wait(
            namespace, name, lambda p: p["status"].get("phase") in ("Succeeded", "Failed"), "ends"
        )
        state: JSON = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        return state


@pytest.fixture(scope="module")
def node(local_env: LocalEnv) -> Iterator[Node]:
    kube = Kube.connect(local_env.kubeconfig)
    name = "oci-test-" + secrets.token_hex(3)
    args = [
        f"--taint={TAINT['key']}={TAINT['value']}:{TAINT['effect']}",
        "--runtime=oci",
        f"--image-store={image_store_dir()}",
        "--restart-backoff=1",
    ]
    proc = start_agent(local_env, node_name=name, gpus=1, extra_args=args)
    try:
        yield Node(name, proc, local_env)
    finally:
        proc.stop()
        try:
            kube.request("DELETE", f"/api/v1/nodes/{name}")
        except KubeError as exc:
            if exc.status != 404:
                raise


def restricted(command: str, *, image: str = TRAINER_IMAGE, read_only: bool = True, **extra: Any) -> JSON:
    """A pod with the trainer pod's security profile running ``sh -c command``."""
    return {
        "restartPolicy": "Never",
        "securityContext": dict(RESTRICTED_POD),
        "containers": [
            {
                "name": "main",
                "image": image,
                "command": ["sh", "-c", textwrap.dedent(command)],
                "securityContext": {**RESTRICTED_CONTAINER, "readOnlyRootFilesystem": read_only},
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                **extra,
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }


# /var/tmp is on the image's root filesystem (no volume) and writable by every user (1777), so
# the read-only root is the only thing that can refuse this write.
WRITE_OUTSIDE = "echo x > /tmp/ok && python -c \"open('/var/tmp/written-by-the-pod', 'w').write('x')\""


def test_a_write_outside_the_volumes_fails_on_a_read_only_root(node: Node, namespace: str) -> None:
    name = node.run(namespace, restricted(WRITE_OUTSIDE))
    term = node.finished(namespace, name)
    assert term["exitCode"] == 1, term
    assert "Read-only file system" in term.get("message", ""), term


def test_the_same_write_succeeds_without_read_only_root(node: Node, namespace: str) -> None:
    """The guard above is the read-only root and nothing else: without it the write works."""
    name = node.run(namespace, restricted(WRITE_OUTSIDE + " && echo wrote", read_only=False))
    term = node.finished(namespace, name)
    assert term["exitCode"] == 0, term


SECURITY_REPORT = """
    set -eu
    id -u; id -g; id -G
    grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
    echo "home=$HOME path=$PATH"
    echo "secret=$(cat /etc/creds/password)"
    touch /tmp/made && stat -c 'tmp-file-group=%g' /tmp/made
    echo shm > /dev/shm/x
    python -c 'import kubetune_trainer' && echo trainer-importable
    echo report-done > /dev/termination-log
"""


def test_security_context_user_groups_caps_seccomp_and_volumes(node: Node, namespace: str) -> None:
    node.kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t"}},
    )
    spec = restricted(SECURITY_REPORT)
    spec["volumes"].append({"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o440}})
    spec["containers"][0]["volumeMounts"].append(
        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True}
    )
    name = node.run(namespace, spec)
    term = node.finished(namespace, name)
    log = node.log(namespace, name).splitlines()
    assert term["exitCode"] == 0, (term, log)
    assert term["message"] == "report-done\n"
    assert log[:3] == [str(UID), str(UID), str(UID)]  # uid, gid, groups (fsGroup is the same id)
    status = dict(line.split(":\t") for line in log[3:7])
    assert status == {
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }
    assert log[7].startswith("home=/tmp path=/opt/venv/bin:"), log[7]  # the image's ENV
    assert "secret=s3cr3t" in log  # 0440 root-owned, readable through fsGroup
    assert f"tmp-file-group={UID}" in log  # the emptyDir is setgid to the fsGroup
    assert "trainer-importable" in log


def test_run_as_non_root_refuses_an_image_that_runs_as_root(node: Node, namespace: str) -> None:
    """The operator image without runAsUser runs as its own USER; the local base image runs as
    root, so runAsNonRoot keeps it from starting, with the kubelet's reason and message."""
    spec = restricted("id")
    del spec["securityContext"]["runAsUser"]
    spec["containers"][0]["image"] = base_image()
    name = node.run(namespace, spec)

    def refused(pod: JSON) -> bool:
        statuses = pod["status"].get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting", {})
        return bool(waiting.get("reason") == "CreateContainerConfigError")

    pod = node.wait(namespace, name, refused, "CreateContainerConfigError")
    message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert "container has runAsNonRoot and image will run as root" in message


def base_image() -> str:
    """The local Debian base (USER root) by its tag in the store."""
    import json

    images = json.loads((image_store_dir() / "root" / "overlay-images" / "images.json").read_text())
    names = [
        n for entry in images for n in entry.get("names") or [] if n.startswith("localhost/kubetune/python:")
    ]
    assert names, "the local base image is not in the store (make images)"
    return str(names[0])


def test_memory_limit_kills_with_oom(node: Node, namespace: str) -> None:
    spec = restricted("python -c 'b = bytearray(512 * 1024 * 1024); print(len(b))'", image=OPERATOR_IMAGE)
    spec["containers"][0]["resources"] = {"limits": {"memory": "64Mi"}}
    name = node.run(namespace, spec)
    term = node.finished(namespace, name)
    assert (term["exitCode"], term["reason"]) == (137, "OOMKilled"), term


def test_an_image_not_in_the_store_cannot_be_pulled(node: Node, namespace: str) -> None:
    name = node.run(namespace, restricted("true", image="ghcr.io/kubetune/not-built:0.0.0"))

    def pull_failed(pod: JSON) -> bool:
        statuses = pod["status"].get("containerStatuses") or [{}]
        reason = statuses[0].get("state", {}).get("waiting", {}).get("reason")
        return reason in ("ErrImagePull", "ImagePullBackOff")

    node.wait(namespace, name, pull_failed, "ErrImagePull")


def test_the_image_entrypoint_and_user_without_a_command(node: Node, namespace: str) -> None:
    """No command: the trainer image's ENTRYPOINT (python -m kubetune_trainer) as its USER;
    --help (over the image's CMD) proves it started the package."""
    spec = restricted("unused", image=TRAINER_IMAGE)
    del spec["containers"][0]["command"]
    spec["containers"][0]["args"] = ["--help"]
    del spec["securityContext"]["runAsUser"]
    started = time.monotonic()
    name = node.run(namespace, spec)
    term = node.finished(namespace, name)
    assert term["exitCode"] == 0, (term, node.log(namespace, name))
    assert "usage: kubetune-trainer" in node.log(namespace, name)
    assert time.monotonic() - started < 60


def test_an_executable_the_image_lacks_is_a_start_error(node: Node, namespace: str) -> None:
    spec = restricted("unused")
    spec["containers"][0]["command"] = ["/no/such/binary"]
    name = node.run(namespace, spec)
    term = node.finished(namespace, name)
    assert (term["exitCode"], term["reason"]) == (128, "StartError"), term
    assert "/no/such/binary" in term["message"]
