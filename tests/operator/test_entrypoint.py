"""``python -m kubetune_operator`` as a real process: env configuration, /healthz, /metrics,
graceful exit, and two replicas sharing the work through kopf peering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.kube import JOBS, Resource

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

CRDS = Path(__file__).resolve().parents[2] / "crds"
KOPF_PEERINGS = Resource("kopf.dev/v1", "kopfpeerings")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return int(resp.status), resp.read().decode()


class Replica:
    """One operator process and its log."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.metrics_port = int(env["KUBETUNE_METRICS_PORT"])
        self.health_port = int(env["KUBETUNE_HEALTH_PORT"])
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            return _get(self.health_port, "/healthz")[0] == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def start_replica(
    local_env: Any, namespace: str, crd_installed: Any, tmp_path: Path
) -> Iterator[Callable[..., Replica]]:
    replicas: list[Replica] = []

    def start(**extra_env: str) -> Replica:
        env = {
            **os.environ,
            "KUBECONFIG": str(local_env.kubeconfig),
            "KUBETUNE_NAMESPACES": namespace,
            "KUBETUNE_TRAINER_IMAGE": "registry.example/kubetune/trainer:test",
            "KUBETUNE_METRICS_PORT": str(_free_port()),
            "KUBETUNE_HEALTH_PORT": str(_free_port()),
            "KUBETUNE_BIND_ADDRESS": "127.0.0.1",
            **extra_env,
        }
        replica = Replica(env, tmp_path / f"operator-{len(replicas)}.log")
        replicas.append(replica)
        return replica

    yield start
    for replica in replicas:
        replica.stop(signal.SIGKILL)


def test_entrypoint_serves_health_and_metrics_and_exits_cleanly(
    start_replica: Callable[..., Replica], harness: Any
) -> None:
    replica = start_replica()
    harness.wait_for("/healthz", replica.healthy, timeout=60)
    harness.create("entry", suspend=True)
    harness.wait_phase("entry", "Suspended")

    status, metrics = _get(replica.metrics_port, "/metrics")
    assert status == 200
    assert 'kubetune_finetunejobs{phase="Suspended"} 1.0' in metrics
    assert replica.stop(signal.SIGTERM) == 0, replica.output()
    assert "default trainer image registry.example/kubetune/trainer:test" in replica.output()


def test_two_replicas_share_one_peering(
    local_env: Any, start_replica: Callable[..., Replica], harness: Any
) -> None:
    for name in ("kopf.dev_kopfpeerings.yaml", "kopf.dev_clusterkopfpeerings.yaml"):
        local_env.kubectl("apply", "--server-side", "-f", str(CRDS / name))
    local_env.wait_established("kopfpeerings.kopf.dev")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubetune"}}
    harness.kube.request("POST", KOPF_PEERINGS.path(harness.namespace), body=peering)
    leader = start_replica(KUBETUNE_PEERING="kubetune", KUBETUNE_PEERING_PRIORITY="200")
    follower = start_replica(KUBETUNE_PEERING="kubetune", KUBETUNE_PEERING_PRIORITY="100")

    def both_registered() -> bool:
        peering = harness.kube.get(KOPF_PEERINGS, harness.namespace, "kubetune") or {}
        return len(peering.get("status") or {}) == 2

    harness.wait_for("both replicas in the peering", both_registered, timeout=60)

    harness.create("first")
    harness.wait_phase("first", "Pending")
    assert len(harness.kube.list(JOBS, harness.namespace, "kubetune.dev/finetunejob=first")) == 1
    harness.wait_for(
        "the leader's FineTuneJob handler", lambda: "'finetunejob_event' succeeded" in leader.output()
    )
    assert "finetunejob" not in follower.output()  # paused: the higher priority serves

    # A graceful leader exit withdraws it from the peering: the follower resumes at once.
    assert leader.stop(signal.SIGTERM) == 0, leader.output()
    harness.wait_for("the follower to resume", lambda: "Resuming operations" in follower.output(), timeout=60)
    harness.create("second")
    harness.wait_phase("second", "Pending")
    assert len(harness.kube.list(JOBS, harness.namespace, "kubetune.dev/finetunejob=second")) == 1
    assert len(harness.kube.list(JOBS, harness.namespace, "kubetune.dev/finetunejob=first")) == 1
