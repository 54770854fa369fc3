"""Scale-test additions to the local control plane: kube-scheduler and kwok fake nodes.

kwok plays kubelet for many fake nodes at once: it marks scheduled pods Running
and completes Job pods (its built-in "fast" stages), without running anything.
Used by the benchmarks under ``bench/``, with what they measure by: the API server's request
counts (/metrics) and audit log, watches that time each event's arrival, and /proc for a
process's memory and CPU.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from kubetune_operator.kube import Kube, KubeError

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


#: Client-side rate limits high enough never to throttle (as kwokctl's --disable-qps-limits sets):
#: kube-controller-manager's default (20 requests/s) would otherwise pace every Job on the cluster.
UNTHROTTLED = ("--kube-api-qps=5000", "--kube-api-burst=10000")


def unthrottle(env: LocalEnv) -> None:
    """Lift kube-controller-manager's client rate limit (``env`` not started yet)."""
    env.controller_manager_args += UNTHROTTLED


def start_scheduler(env: LocalEnv, extra_args: Sequence[str] = ()) -> ManagedProcess:
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
            *extra_args,
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


# -- measuring: the API server's request counts, its audit log, watches, a process's usage ---------

#: Every request, at Metadata level (verb, resource, user agent, code: never a body), logged once
#: it completes (and, for a watch, also when its stream starts). An audit log is the one place
#: the API server names the client of each request: its /metrics count requests by verb and
#: resource but not by client.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}
READ_VERBS = frozenset({"get", "list", "watch"})
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
#: apiserver_request_total's verbs (HTTP methods, LIST and WATCH told apart) as the audit log's.
METRIC_VERBS = {"POST": "create", "PUT": "update", "APPLY": "patch", "WATCHLIST": "watch"}


def enable_audit_log(env: LocalEnv, directory: Path) -> Path:
    """Make ``env``'s kube-apiserver (not started yet) write a JSON audit log; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "audit-policy.json"
    policy.write_text(json.dumps(AUDIT_POLICY))
    log = directory / "audit.log"
    env.apiserver_args += [
        f"--audit-policy-file={policy}",
        f"--audit-log-path={log}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",  # every request, none dropped under load
        "--audit-log-maxsize=0",  # never rotated during a run
    ]
    return log


def audit_offset(log: Path) -> int:
    """Where the audit log's last complete line ends now: pass two of these to :func:`audit_counts`.

    The API server writes the log while it is read: its last line may be half written.
    """
    if not log.exists():
        return 0
    with log.open("rb") as f:
        end = f.seek(0, 2)
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


def audit_counts(log: Path, start: int, end: int) -> dict[str, Counter[tuple[str, str]]]:
    """Requests logged between two offsets, by user agent (up to its first "/"), then (verb, resource).

    A request counts once (by audit ID), and the resource names its subresource (``jobs/status``).
    """
    seen: set[str] = set()
    counts: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    with log.open("rb") as f:
        f.seek(start)
        for line in f.read(end - start).splitlines():
            event = json.loads(line)
            if event["auditID"] in seen:
                continue
            seen.add(event["auditID"])
            ref = event.get("objectRef") or {}
            resource = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            agent = str(event.get("userAgent", "")).split("/")[0] or "?"
            counts[agent][(event["verb"], resource)] += 1
    return counts


def request_totals(env: LocalEnv) -> Counter[tuple[str, str]]:
    """The API server's ``apiserver_request_total`` (every client), summed by (verb, resource)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: Counter[tuple[str, str]] = Counter()
    text = env.api_get("/metrics", timeout=30).decode()
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                labels = sample.labels
                resource = labels.get("resource") or "(non-resource)"
                if labels.get("subresource"):
                    resource += "/" + labels["subresource"]
                verb = METRIC_VERBS.get(labels["verb"], labels["verb"].lower())
                totals[(verb, resource)] += int(sample.value)
    return totals


@dataclass(frozen=True)
class ProcessUsage:
    """What /proc says of one process: its peak and current resident set, its CPU time so far."""

    peak_rss_bytes: int
    rss_bytes: int
    cpu_seconds: float


def process_usage(pid: int) -> ProcessUsage:
    """VmHWM and VmRSS from /proc/<pid>/status, utime + stime from /proc/<pid>/stat."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(stat[11]) + int(stat[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ProcessUsage(
        peak_rss_bytes=int(fields["VmHWM"].split()[0]) * 1024,
        rss_bytes=int(fields["VmRSS"].split()[0]) * 1024,
        cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"),
    )


#: Called with (event type, object, time.monotonic() when the event arrived).
OnEvent = Callable[[str, dict[str, Any], float], None]


class Follow(threading.Thread):
    """Follows one collection's watch from a list onward and hands every event to ``on_event``.

    The arrival time is taken as the line is read, so it is precise to the watch's own latency
    (the API server's timestamps have one-second precision). A daemon thread: it ends with the
    benchmark, or with the API server.
    """

    def __init__(
        self, kube: Kube, path: str, on_event: OnEvent, selector: str = "", fields: str = ""
    ) -> None:
        super().__init__(name=f"follow {path}", daemon=True)
        self.kube = kube
        self.path = path
        self.on_event = on_event
        # A field selector (status.phase=Succeeded) spares the watcher, and this 2-core machine,
        # the events it would only drop.
        self.params = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", fields)) if v}
        self.version = self._list()

    def _list(self) -> str:
        listing = self.kube.request("GET", self.path, params=self.params or None)
        now = time.monotonic()
        for item in listing.get("items", []):
            self.on_event("ADDED", item, now)
        return str(listing["metadata"]["resourceVersion"])

    def run(self) -> None:
        while True:
            try:
                params = {**self.params, "resourceVersion": self.version, "allowWatchBookmarks": "true"}
                for event in self.kube.watch(self.path, params, timeout_seconds=60):
                    now = time.monotonic()
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":  # 410 Gone: too far behind, list again
                        self.version = self._list()
                        break
                    self.version = str(obj.get("metadata", {}).get("resourceVersion", self.version))
                    if event.get("type") != "BOOKMARK":
                        self.on_event(str(event.get("type")), obj, now)
            except (OSError, ValueError, KubeError, urllib3.exceptions.HTTPError):
                # The API server went away (the end of a run) or a stream broke: watch again.
                time.sleep(0.5)
