"""The node agent: a small kubelet (and scheduler) for a machine without Docker.

It registers a Ready Node, binds pending pods that fit on it and runs their
containers as local processes in private mount and PID namespaces, reporting
their state back to the API server.  See docs/nodeagent.md for what it supports.

Usage::

    python -m kubetune_localenv.nodeagent --kubeconfig .kubetune/kubeconfig \\
        --node-name kubetune-local --state-dir .kubetune/nodes/kubetune-local --gpus 1

or, from Python, :func:`start_agent` for a running :class:`~.cluster.LocalEnv`.

The agent does not listen on any port.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import nodeagent_images as images
from .cluster import LaunchError, LocalEnv, ManagedProcess
from .nodeagent_cgroup import MemoryCgroups
from .nodeagent_kube import MERGE_PATCH, STRATEGIC_MERGE_PATCH, ApiError, Kube
from .nodeagent_pod import EXEC_HELPER, AgentContext, PodWorker, now_rfc3339
from .nodeagent_sched import is_terminal, unfit_reason

JSON = dict[str, Any]
DEFAULT_NODE_NAME = "kubetune-local"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
WATCH_SECONDS = 60
# The watches only wake the reconcile loop, which then lists what it needs: a
# missed or broken watch costs latency, never correctness (level-triggered).
RESYNC_SECONDS = 5.0
DEFAULT_GRACE_SECONDS = 30.0
VANISHED_POD_GRACE_SECONDS = 2.0
EXTENDED_GPU = "nvidia.com/gpu"

log = logging.getLogger("nodeagent")


# -- public API for the launcher -----------------------------------------------------
def agent_state_dir(env: LocalEnv, node_name: str = DEFAULT_NODE_NAME) -> Path:
    """Where the agent for ``node_name`` keeps its pods (``pods/<ns>_<pod>/<container>.log``)."""
    return env.state_dir / "nodes" / node_name


def pod_log_path(
    env: LocalEnv, namespace: str, pod: str, container: str, node_name: str = DEFAULT_NODE_NAME
) -> Path:
    """The log file of one container run by the agent of ``node_name``."""
    return agent_state_dir(env, node_name) / "pods" / f"{namespace}_{pod}" / f"{container}.log"


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
        "kubetune_localenv.nodeagent",
        f"--kubeconfig={env.kubeconfig}",
        f"--node-name={node_name}",
        f"--state-dir={agent_state_dir(env, node_name)}",
        f"--gpus={gpus}",
    ]
    if image_map is not None:
        argv.append(f"--image-map={image_map}")
    return [*argv, *extra_args]


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
    kube = Kube(env.kubeconfig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"node agent exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        try:
            if _node_ready(kube.get(f"/api/v1/nodes/{node_name}")):
                return proc
        except ApiError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise LaunchError(
        f"node {node_name} not Ready after {timeout:.0f}s; log {proc.log_path}:\n{proc.log_tail()}"
    )


def _node_ready(node: JSON) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# -- host facts ------------------------------------------------------------------------
def host_memory_bytes() -> int:
    """Physical memory, or the memory cgroup's limit if that is smaller."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def check_namespaces() -> None:
    """Exit with a clear message if containers cannot get their own mount/PID namespaces."""
    probe = subprocess.run(
        [sys.executable, str(EXEC_HELPER), "--probe"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        sys.exit(
            "nodeagent: cannot create private mount/PID namespaces for containers "
            f"({probe.stderr.strip()}); run the agent as root (or with CAP_SYS_ADMIN)"
        )


def _parse_taint(text: str) -> JSON:
    key_value, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"taint {text!r}: expected KEY[=VALUE]:EFFECT")
    key, _, value = key_value.partition("=")
    taint: JSON = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint


def _parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r}: expected KEY=VALUE")
    return key, value


# -- the agent ---------------------------------------------------------------------------
class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node_name: str = args.node_name
        self.kube = Kube(args.kubeconfig)
        self.state_dir: Path = args.state_dir
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.done: set[str] = set()
        self.unschedulable: dict[str, str] = {}
        self.node: JSON = {}
        self._since = now_rfc3339()
        self._boot_id = str(uuid.uuid4())
        self._table_path: Path = args.image_map
        self._table: tuple[float, list[images.ImageRule]] = (-1.0, [])
        self.ctx = AgentContext(
            kube=self.kube,
            node_name=self.node_name,
            state_dir=self.state_dir,
            image_table=self.image_table,
            node=lambda: self.node,
            restart_backoff=args.restart_backoff,
            cgroups=self._memory_cgroups() if args.memory_limits else None,
        )

    def _memory_cgroups(self) -> MemoryCgroups | None:
        cgroups = MemoryCgroups.detect(f"kubetune-nodeagent-{self.node_name}")
        if cgroups is None:
            log.warning("no memory cgroups available: memory limits are not enforced")
            return None
        return cgroups if cgroups.prepare() else None

    def image_table(self) -> list[images.ImageRule]:
        """The image table, re-read when the file changes."""
        mtime = self._table_path.stat().st_mtime
        if mtime != self._table[0]:
            self._table = (mtime, images.load_table(self._table_path))
        return self._table[1]

    # -- node ----------------------------------------------------------------------
    def _resources(self) -> JSON:
        resources: JSON = {
            "cpu": str(self.args.cpu),
            "memory": str(self.args.memory),
            "pods": str(self.args.pods),
            "ephemeral-storage": "100Gi",
        }
        if self.args.gpus:
            resources[EXTENDED_GPU] = str(self.args.gpus)
        return resources

    def _conditions(self, ready: bool, reason: str, message: str) -> list[JSON]:
        now = now_rfc3339()
        pressure = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHas{suffix}",
                "message": f"node agent does not measure {kind}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._since,
            }
            for kind, suffix in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        ready_condition = {
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now if not ready else self._since,
        }
        return [*pressure, ready_condition]

    def _node_status(self) -> JSON:
        resources = self._resources()
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": self._conditions(
                True, "KubeletReady", "kubetune node agent is posting ready status"
            ),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name)),
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "kubetune node agent",
                "containerRuntimeVersion": "nodeagent://0.1.0",
                "kubeletVersion": "v0.0.0-nodeagent",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    platform.machine(), platform.machine()
                ),
            },
        }

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": self._node_status()["nodeInfo"]["architecture"],
            "node.kubernetes.io/instance-type": "kubetune-local",
            **dict(self.args.label),
        }
        meta: JSON = {"name": self.node_name, "labels": labels}
        spec: JSON = {"taints": list(self.args.taint), "unschedulable": False}
        try:
            self.kube.request(
                "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec}
            )
            log.info("registered node %s", self.node_name)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.kube.request(
                "PATCH",
                f"/api/v1/nodes/{self.node_name}",
                {"metadata": meta, "spec": spec},
                content_type=MERGE_PATCH,
            )
            log.info("node %s already registered; updated it", self.node_name)
        self.node = self.kube.request(
            "PATCH",
            f"/api/v1/nodes/{self.node_name}/status",
            {"status": self._node_status()},
            content_type=MERGE_PATCH,
        )
        self._renew_lease()

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.node_name}"
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}
        try:
            self.kube.request("PATCH", path, {"spec": spec}, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status != 404:
                raise
            owner = {
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.node_name,
                "uid": self.node["metadata"]["uid"],
            }
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.node_name, "ownerReferences": [owner]},
                "spec": spec,
            }
            self.kube.request("POST", path.rsplit("/", 1)[0], lease)

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.args.heartbeat):
            try:
                self._renew_lease()
                self.kube.request(
                    "PATCH",
                    f"/api/v1/nodes/{self.node_name}/status",
                    {"status": {"conditions": self._node_status()["conditions"]}},
                    content_type=MERGE_PATCH,
                )
            except Exception as exc:
                log.warning("heartbeat: %s", exc)

    # -- watches -------------------------------------------------------------------
    def _watch_loop(self, field_selector: str) -> None:
        while not self.stop.is_set():
            try:
                for _event in self.kube.watch(
                    "/api/v1/pods", {"fieldSelector": field_selector}, WATCH_SECONDS
                ):
                    self.wake.set()
                    if self.stop.is_set():
                        return
            except Exception as exc:
                log.debug("watch %s: %s", field_selector, exc)
                self.stop.wait(1.0)

    # -- reconcile -----------------------------------------------------------------
    def _list(self, field_selector: str) -> list[JSON]:
        items: list[JSON] = self.kube.get("/api/v1/pods", {"fieldSelector": field_selector})["items"]
        return items

    def reconcile(self) -> None:
        self.node = self.kube.get(f"/api/v1/nodes/{self.node_name}")
        mine = self._list(f"spec.nodeName={self.node_name}")
        self._sync_own_pods(mine)
        if self.args.bind:
            self._schedule(mine)

    def _sync_own_pods(self, mine: list[JSON]) -> None:
        seen: set[str] = set()
        for pod in mine:
            meta = pod["metadata"]
            uid = str(meta["uid"])
            seen.add(uid)
            deleting = bool(meta.get("deletionTimestamp"))
            worker = self.workers.get(uid)
            if worker is None:
                if uid in self.done or is_terminal(pod):
                    if deleting:
                        self._force_delete(pod)
                    continue
                worker = PodWorker(self.ctx, pod, lost=_has_run(pod))
                self.workers[uid] = worker
                log.info("pod %s/%s: admitted", meta["namespace"], meta["name"])
                worker.start()
            else:
                worker.update(pod)
            if deleting:
                grace = meta.get("deletionGracePeriodSeconds")
                worker.request_stop(float(grace if grace is not None else DEFAULT_GRACE_SECONDS))
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.request_stop(VANISHED_POD_GRACE_SECONDS, delete_object=False)
            if worker.finished.is_set():
                del self.workers[uid]
                self.done.add(uid)
        self.done &= seen | set(self.workers)

    def _force_delete(self, pod: JSON) -> None:
        meta = pod["metadata"]
        if meta.get("deletionGracePeriodSeconds") == 0:
            return  # already deleted with grace 0; a finalizer holds it
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: delete: %s", meta["namespace"], meta["name"], exc)

    def _schedule(self, mine: list[JSON]) -> None:
        pending = self._list("spec.nodeName=,status.phase=Pending")
        pending.sort(key=lambda p: str(p["metadata"].get("creationTimestamp", "")))
        bound = list(mine)
        for pod in pending:
            meta, spec = pod["metadata"], pod["spec"]
            if spec.get("schedulerName", "default-scheduler") != self.args.scheduler_name:
                continue
            if meta.get("deletionTimestamp"):
                continue
            reason = unfit_reason(pod, self.node, bound)
            if reason is not None:
                self._mark_unschedulable(pod, reason)
                continue
            try:
                self._bind(pod)
            except ApiError as exc:
                log.info("pod %s/%s: bind: %s", meta["namespace"], meta["name"], exc)
                continue
            bound.append(pod)
            self.wake.set()  # pick it up as one of ours right away

    def _bind(self, pod: JSON) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        self.kube.request("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body)
        self.unschedulable.pop(str(meta["uid"]), None)
        log.info("pod %s/%s: bound to %s", meta["namespace"], meta["name"], self.node_name)

    def _mark_unschedulable(self, pod: JSON, reason: str) -> None:
        meta = pod["metadata"]
        message = f"0/1 nodes are available: {reason} (node {self.node_name})."
        if self.unschedulable.get(str(meta["uid"])) == message:
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now_rfc3339(),
        }
        body = {"metadata": {"uid": meta["uid"]}, "status": {"conditions": [condition]}}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        try:
            self.kube.request("PATCH", path, body, content_type=STRATEGIC_MERGE_PATCH)
        except ApiError as exc:
            log.info("pod %s/%s: unschedulable status: %s", meta["namespace"], meta["name"], exc)
            return
        self.unschedulable[str(meta["uid"])] = message

    # -- main loop -----------------------------------------------------------------
    def run(self) -> None:
        self.register()
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(
                target=self._watch_loop,
                args=(f"spec.nodeName={self.node_name}",),
                name="watch-own",
                daemon=True,
            ),
        ]
        if self.args.bind:
            threads.append(
                threading.Thread(
                    target=self._watch_loop, args=("spec.nodeName=",), name="watch-pending", daemon=True
                )
            )
        for thread in threads:
            thread.start()
        log.info("node agent for %s running (state in %s)", self.node_name, self.state_dir)
        while not self.stop.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed")
            self.wake.wait(RESYNC_SECONDS)
            self.wake.clear()
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every pod (bounded by --shutdown-grace) and report the node NotReady."""
        log.info("shutting down: stopping %d pod(s)", len(self.workers))
        for worker in self.workers.values():
            worker.request_stop(self.args.shutdown_grace, delete_object=False, shutdown=True)
        deadline = time.monotonic() + self.args.shutdown_grace + 3
        for worker in self.workers.values():
            worker.join(max(0.1, deadline - time.monotonic()))
        if self.ctx.cgroups is not None:
            self.ctx.cgroups.close()
        try:
            conditions = self._conditions(False, "NodeAgentStopped", "the kubetune node agent stopped")
            self.kube.request(
                "PATCH",
                f"/api/v1/nodes/{self.node_name}/status",
                {"status": {"conditions": conditions}},
                content_type=MERGE_PATCH,
                timeout=3,
            )
        except Exception as exc:
            log.warning("could not report the node NotReady: %s", exc)


def _has_run(pod: JSON) -> bool:
    """Whether some container of ``pod`` was started (by an earlier agent)."""
    status = pod.get("status", {})
    if status.get("phase") == "Running":
        return True
    statuses = [*(status.get("containerStatuses") or []), *(status.get("initContainerStatuses") or [])]
    return any(
        "running" in (s.get("state") or {}) or "terminated" in (s.get("state") or {}) for s in statuses
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_localenv.nodeagent", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig of the cluster to join")
    parser.add_argument(
        "--node-name", default=DEFAULT_NODE_NAME, help="name of the Node (default %(default)s)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where pod directories and logs go (default .kubetune/nodes/<node-name>)",
    )
    parser.add_argument(
        "--gpus", type=int, default=1, help=f"{EXTENDED_GPU} to advertise (default %(default)s)"
    )
    parser.add_argument(
        "--cpu", default=str(os.cpu_count() or 1), help="allocatable cpu (default: all cores)"
    )
    parser.add_argument(
        "--memory", default=None, help="allocatable memory (default: the host's or the cgroup's)"
    )
    parser.add_argument("--pods", type=int, default=110, help="maximum pods (default %(default)s)")
    parser.add_argument(
        "--image-map", type=Path, default=images.DEFAULT_TABLE, help="image table (default %(default)s)"
    )
    parser.add_argument(
        "--label", type=_parse_label, action="append", default=[], help="extra node label KEY=VALUE"
    )
    parser.add_argument(
        "--taint", type=_parse_taint, action="append", default=[], help="node taint KEY[=VALUE]:EFFECT"
    )
    parser.add_argument("--scheduler-name", default="default-scheduler", help="bind pods of this scheduler")
    parser.add_argument(
        "--no-bind", dest="bind", action="store_false", help="only run pods already assigned to this node"
    )
    parser.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="first container restart delay, doubled per restart",
    )
    parser.add_argument(
        "--no-memory-limits",
        dest="memory_limits",
        action="store_false",
        help="do not enforce limits.memory with memory cgroups",
    )
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between node heartbeats")
    parser.add_argument(
        "--shutdown-grace", type=float, default=5.0, help="on SIGTERM, longest wait for pods to stop"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.state_dir is None:
        args.state_dir = Path(".kubetune") / "nodes" / args.node_name
    if args.memory is None:
        args.memory = str(host_memory_bytes())
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s",
        stream=sys.stderr,
    )
    args.state_dir = args.state_dir.resolve()
    args.state_dir.mkdir(parents=True, exist_ok=True)
    images.load_table(args.image_map)  # fail fast on a broken table
    check_namespaces()
    agent = Agent(args)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        agent.stop.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()


if __name__ == "__main__":
    main()
