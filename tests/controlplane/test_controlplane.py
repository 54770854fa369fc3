"""The local control plane and S3 server are real and behave like a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_localenv.cluster import LocalEnv, pid_alive
from kubetune_localenv.stack import wait_for

pytestmark = pytest.mark.cluster


def test_kubectl_version_reports_v1_36(local_env: LocalEnv) -> None:
    out = json.loads(local_env.kubectl("version", "-o", "json"))
    assert out["serverVersion"]["gitVersion"].startswith("v1.36.")
    assert out["serverVersion"]["minor"] == "36"
    assert out["clientVersion"]["gitVersion"].startswith("v1.36.")


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.kubetune.dev"},
    "spec": {
        "group": "test.kubetune.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            }
        ],
    },
}


def test_custom_resource_create_read_watch_and_status(
    local_env: LocalEnv, kube_api: Any, namespace: str
) -> None:
    from kubernetes import client, watch

    local_env.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    local_env.wait_established("widgets.test.kubetune.dev")
    custom = client.CustomObjectsApi(kube_api)
    args = ("test.kubetune.dev", "v1", namespace, "widgets")
    body: dict[str, Any] = {"apiVersion": "test.kubetune.dev/v1", "kind": "Widget"}
    body.update(metadata={"name": "w1"}, spec={"size": 3})
    created = custom.create_namespaced_custom_object(*args, body)
    assert custom.get_namespaced_custom_object(*args, "w1")["spec"] == {"size": 3}

    patched = custom.patch_namespaced_custom_object_status(*args, "w1", {"status": {"phase": "Ready"}})
    assert patched["status"] == {"phase": "Ready"}
    # The status subresource ignores spec changes and the main resource ignores status.
    custom.patch_namespaced_custom_object(*args, "w1", {"status": {"phase": "Nope"}})
    assert custom.get_namespaced_custom_object(*args, "w1")["status"] == {"phase": "Ready"}

    events = []
    stream = watch.Watch().stream(
        custom.list_namespaced_custom_object,
        *args,
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=20,
    )
    for event in stream:
        events.append((event["type"], event["object"].get("status")))
        if event["object"].get("status") == {"phase": "Ready"}:
            break
    assert ("MODIFIED", {"phase": "Ready"}) in events


def test_job_creates_pod_and_deleting_it_collects_the_pod(kube_api: Any, namespace: str) -> None:
    from kubernetes import client

    batch = client.BatchV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="hello"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="c", image="busybox", command=["true"])],
                )
            ),
        ),
    )
    batch.create_namespaced_job(namespace, job)
    pods = wait_for(
        "kube-controller-manager to create the Job's pod",
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=hello").items,
    )
    assert pods[0].metadata.owner_references[0].kind == "Job"

    batch.delete_namespaced_job("hello", namespace, propagation_policy="Background")
    wait_for(
        "the garbage collector to delete the pod",
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=hello").items,
    )


def test_service_account_token_authenticates_and_rbac_denies_the_rest(
    local_env: LocalEnv, kube_api: Any, namespace: str
) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "read-cm"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-cm"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    request = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    )
    token = request.status.token
    assert token.count(".") == 2  # a signed JWT

    conf = client.Configuration()
    conf.host = local_env.apiserver_url
    conf.ssl_ca_cert = str(local_env.pki.ca_crt)
    conf.api_key = {"authorization": token}
    conf.api_key_prefix = {"authorization": "Bearer"}
    as_reader = client.CoreV1Api(client.ApiClient(conf))

    assert as_reader.read_namespaced_config_map("cm", namespace).data == {"k": "v"}
    with pytest.raises(ApiException) as denied:
        as_reader.list_namespaced_secret(namespace)
    assert denied.value.status == 403
    assert f"system:serviceaccount:{namespace}:reader" in denied.value.body


def test_s3_multipart_upload_list_and_download(s3_client: Any, bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    payload = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    config = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3_client.upload_file(str(src), bucket, "data/blob.bin", Config=config)

    head = s3_client.head_object(Bucket=bucket, Key="data/blob.bin")
    assert head["ContentLength"] == len(payload)
    assert head["ETag"].strip('"').endswith("-4")  # four 5 MiB parts: it really was multipart

    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="data/")
    assert [o["Key"] for o in listed["Contents"]] == ["data/blob.bin"]

    dst = tmp_path / "back.bin"
    s3_client.download_file(bucket, "data/blob.bin", str(dst), Config=config)
    assert dst.read_bytes() == payload


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_localenv", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _pids(state: Path) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads((state / "state.json").read_text())["pids"].items()}


def test_cluster_up_and_down_leave_no_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = _cli("up", "--state", str(state), "--no-agent")
    assert up.returncode == 0, up.stderr
    assert "kubeconfig" in up.stderr
    pids = _pids(state)
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "versitygw"}
    s3_env = dict(line.split("=", 1) for line in (state / "s3.env").read_text().splitlines())
    assert s3_env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    expected = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert set(s3_env) == expected
    assert _cli("status", "--state", str(state)).returncode == 0

    down = _cli("down", "--state", str(state))
    assert down.returncode == 0, down.stderr
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert _cli("status", "--state", str(state)).returncode == 1


def test_killed_launcher_leaves_no_process_and_busy_ports_are_avoided(tmp_path: Path) -> None:
    import socket

    # Hold the ports the launcher would prefer: it must pick others.
    held = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held.append(sock)
    busy_api, busy_s3 = (s.getsockname()[1] for s in held)
    env = dict(os.environ, KUBETUNE_APISERVER_PORT=str(busy_api), KUBETUNE_S3_PORT=str(busy_s3))
    state = tmp_path / "state"
    try:
        up = _cli("up", "--state", str(state), "--no-agent", env=env)
        assert up.returncode == 0, up.stderr
        kubeconfig = json.loads((state / "kubeconfig").read_text())
        server = kubeconfig["clusters"][0]["cluster"]["server"]
        assert server.startswith("https://127.0.0.1:")
        assert not server.endswith(f":{busy_api}")
        assert f":{busy_s3}" not in (state / "s3.env").read_text()
    finally:
        for sock in held:
            sock.close()

    pids = _pids(state)
    supervisor = int((state / "supervisor.pid").read_text())
    os.kill(supervisor, signal.SIGKILL)  # as if the session were interrupted
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids.values()):
        time.sleep(0.2)
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
