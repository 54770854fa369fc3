"""Scale-test additions to the local control plane: kube-scheduler and kwok fake nodes.

kwok plays kubelet for many fake nodes at once: it marks scheduled pods Running
and completes Job pods (its built-in "fast" stages), without running anything.
Used by the benchmarks under ``bench/``.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from pathlib import Path

from . import tools
from .cluster import LOCALHOST, LaunchError, LocalEnv, ManagedProcess, pick_port

KWOK_NODE_LABEL = "kubetune.dev/fake-node"
KWOK_STAGES = Path(__file__).resolve().parent.parent / "kwok-stages.yaml"


def _wait_healthy(proc: ManagedProcess, url: str, timeout: float = 60.0) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert on loopback
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"{proc.name} exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                if resp.read() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LaunchError(f"{proc.name} not healthy after {timeout:.0f}s; log {proc.log_path}")


def start_scheduler(env: LocalEnv) -> ManagedProcess:
    """kube-scheduler on 127.0.0.1 (the base control plane has none: the node agent binds)."""
    binary = tools.build("kube-scheduler")
    port = pick_port()
    proc = ManagedProcess(
        "kube-scheduler",
        [
            str(binary),
            f"--kubeconfig={env.kubeconfig}",
            f"--authentication-kubeconfig={env.kubeconfig}",
            f"--authorization-kubeconfig={env.kubeconfig}",
            f"--bind-address={LOCALHOST}",
            f"--secure-port={port}",
            "--leader-elect=false",
        ],
        env.logs_dir / "kube-scheduler.log",
    )
    proc.start()
    _wait_healthy(proc, f"https://{LOCALHOST}:{port}/healthz")
    return proc


def start_kwok(env: LocalEnv) -> ManagedProcess:
    """kwok managing every node labelled ``KWOK_NODE_LABEL=true``."""
    binary = tools.build("kwok")
    proc = ManagedProcess(
        "kwok",
        [
            str(binary),
            f"--kubeconfig={env.kubeconfig}",
            f"--config={KWOK_STAGES}",
            f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}=true",
            f"--server-address={LOCALHOST}:{pick_port()}",
        ],
        env.logs_dir / "kwok.log",
    )
    proc.start()
    time.sleep(1.0)
    if not proc.alive():
        raise LaunchError(f"kwok exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
    return proc


def fake_node(name: str, gpus: int = 1000) -> dict[str, object]:
    """A large fake node for kwok: room for hundreds of GPU pods."""
    capacity = {"cpu": "1000", "memory": "4Ti", "pods": "5000", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {KWOK_NODE_LABEL: "true", "kubernetes.io/hostname": name, "type": "kwok"},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def add_fake_nodes(env: LocalEnv, count: int) -> None:
    for i in range(count):
        env.kubectl("apply", "-f", "-", input=json.dumps(fake_node(f"kwok-node-{i}")))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = json.loads(env.kubectl("get", "nodes", "-l", f"{KWOK_NODE_LABEL}=true", "-o", "json"))
        ready = [
            n
            for n in out["items"]
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        ]
        if len(ready) >= count:
            return
        time.sleep(0.3)
    raise LaunchError(f"kwok did not make the fake nodes Ready within 60s; see {env.logs_dir / 'kwok.log'}")
