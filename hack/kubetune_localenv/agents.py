"""Node agents for a :class:`~.cluster.LocalEnv`: start one as a managed process and wait for its Node.

The agent itself is the ``kubetune_nodeagent`` package; this is the launcher's side of it: its
command line, its state folder, and where the containers' logs end up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_nodeagent.node import DEFAULT_NODE_NAME
from kubetune_operator.kube import Kube, KubeError

from .cluster import LaunchError, LocalEnv, ManagedProcess


def agent_state_dir(env: LocalEnv, node_name: str = DEFAULT_NODE_NAME) -> Path:
    """Where the agent for ``node_name`` keeps its pods (``pods/<ns>_<pod>/<container>.log``)."""
    return env.state_dir / "nodes" / node_name


def pod_log_path(
    env: LocalEnv, namespace: str, pod: str, container: str, node_name: str = DEFAULT_NODE_NAME
) -> Path:
    """The log file of one container run by the agent of ``node_name``."""
    return agent_state_dir(env, node_name) / "pods" / f"{namespace}_{pod}" / f"{container}.log"


def container_log(env: LocalEnv, pod: Mapping[str, Any], container: str) -> str:
    """What one container of ``pod`` (as the API returns it) has logged so far ("" before it runs)."""
    meta = pod["metadata"]
    path = pod_log_path(env, meta["namespace"], meta["name"], container)
    return path.read_text(errors="replace") if path.exists() else ""


def agent_argv(
    env: LocalEnv,
    *,
    node_name: str = DEFAULT_NODE_NAME,
    gpus: int = 1,
    image_map: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "kubetune_nodeagent",
        f"--kubeconfig={env.kubeconfig}",
        f"--node-name={node_name}",
        f"--state-dir={agent_state_dir(env, node_name)}",
        f"--gpus={gpus}",
    ]
    if image_map is not None:
        argv.append(f"--image-map={image_map}")
    return [*argv, *extra_args]


def _node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def start_agent(
    env: LocalEnv,
    *,
    node_name: str = DEFAULT_NODE_NAME,
    gpus: int = 1,
    image_map: Path | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start a node agent for ``env`` (dies with its parent) and wait until its Node is Ready.

    Fits ``LocalEnv.extra_start``: ``env.extra_start.append(start_agent)``.
    """
    argv = agent_argv(env, node_name=node_name, gpus=gpus, image_map=image_map, extra_args=extra_args)
    proc = ManagedProcess(f"nodeagent-{node_name}", argv, env.logs_dir / f"nodeagent-{node_name}.log")
    proc.start()
    kube = Kube.connect(env.kubeconfig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"node agent exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        try:
            if _node_ready(kube.request("GET", f"/api/v1/nodes/{node_name}")):
                return proc
        except KubeError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise LaunchError(
        f"node {node_name} not Ready after {timeout:.0f}s; log {proc.log_path}:\n{proc.log_tail()}"
    )
