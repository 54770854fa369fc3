"""A pod worker while the API server cannot be reached (issue 16, fault 4).

The end-to-end restart (kube-apiserver stopped mid-training, the node agent's pod running on) is
tests/faults/test_outages.py. A worker only calls the API server now and then: to write volumes,
to build env from ConfigMaps and Secrets, and to refresh a projected service-account token (at
80 % of its lifetime, about 48 minutes for the default token). Those calls must meet an API
server that is down like one that answers with an error: retried later, the containers left
running. Here the API server is a closed port on 127.0.0.1 (connection refused, as during a
restart) and the worker's steps are run directly.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from kubetune_nodeagent.podspec import TOKEN_RETRY_SECONDS, TokenFile
from kubetune_nodeagent.worker import AgentContext, PodWorker
from kubetune_operator.kube import Kube

JSON = dict[str, Any]


@pytest.fixture
def unreachable_kube() -> Kube:
    """A client for an API server that is not there: its port refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    configuration = k8s_client.Configuration()
    configuration.host = f"https://127.0.0.1:{port}"
    return Kube(configuration, timeout=2)


def _worker(kube: Kube, state_dir: Path, spec: JSON) -> PodWorker:
    ctx = AgentContext(
        kube=kube, node_name="n", state_dir=state_dir, image_table=lambda: [], node=lambda: {"metadata": {}}
    )
    pod = {
        "metadata": {"namespace": "ns", "name": "p", "uid": "u-1"},
        "spec": {"restartPolicy": "Never", **spec},
    }
    return PodWorker(ctx, pod)


def test_a_token_refresh_due_while_the_api_server_is_down_is_retried_later(
    unreachable_kube: Kube, tmp_path: Path
) -> None:
    """Before the fix the connection error escaped the worker's step: "worker failed", and the
    worker's cleanup killed the pod's containers (a trainer mid-run)."""
    worker = _worker(unreachable_kube, tmp_path, {"containers": []})
    worker.state.initialized = True
    token = TokenFile(tmp_path / "token", service_account="default", audience=None, expiration_seconds=3600)
    worker.resolver.tokens = [token]
    before = time.time()
    worker._step()  # the refresh is due (refresh_at 0): it fails, and the step goes on
    assert before + TOKEN_RETRY_SECONDS - 1 <= token.refresh_at <= time.time() + TOKEN_RETRY_SECONDS


def test_volumes_that_cannot_be_read_while_the_api_server_is_down_are_retried(
    unreachable_kube: Kube, tmp_path: Path
) -> None:
    spec = {
        "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
        "volumes": [{"name": "config", "configMap": {"name": "settings"}}],
    }
    worker = _worker(unreachable_kube, tmp_path, spec)
    worker.dir.prepare()
    worker._prepare_volumes()  # the ConfigMap cannot be read: not ready yet, tried again
    assert not worker.state.volumes_ready
