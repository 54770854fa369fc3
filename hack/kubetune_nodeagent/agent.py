"""The agent: the loop that keeps this node's pods in line with the API server.

Level-triggered: two watches (this node's pods, and unbound pods when binding) only wake the
reconcile loop, which then lists what it needs, so a missed or broken watch costs latency, never
correctness. Each pod of the node gets a :class:`~.worker.PodWorker`; pending pods that fit are
bound here (:mod:`.scheduling`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from kubetune_operator.kube import Kube, KubeError

from . import images
from .cgroup import MemoryCgroups
from .containers import OciRuntime
from .imagestore import ImageStore
from .node import NodeRegistration, NodeShape
from .scheduling import Binder, is_terminal
from .worker import AgentContext, PodWorker

JSON = dict[str, Any]
WATCH_SECONDS = 60
RESYNC_SECONDS = 5.0
DEFAULT_GRACE_SECONDS = 30.0
VANISHED_POD_GRACE_SECONDS = 2.0

log = logging.getLogger("nodeagent")


@dataclass(frozen=True)
class AgentSettings:
    """How the agent behaves (from its command line)."""

    state_dir: Path
    image_table: Path
    bind: bool = True
    scheduler_name: str = "default-scheduler"
    restart_backoff: float = 10.0
    memory_limits: bool = True
    heartbeat: float = 10.0
    shutdown_grace: float = 5.0
    #: ``process`` (the command as a local process, the default) or ``oci`` (the image's root
    #: filesystem under crun, with the pod's security context; docs/nodeagent.md).
    runtime: str = "process"
    #: OCI mode: the store ``make images`` fills (its containers-storage is ``root/``), and its driver.
    image_store: Path | None = None
    storage_driver: str = "overlay"
    #: OCI mode: the runtime binary (crun).
    oci_runtime: str = "crun"


class ImageTable:
    """The image table, re-read when its file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[float, list[images.ImageRule]] = (-1.0, [])

    def __call__(self) -> list[images.ImageRule]:
        mtime = self.path.stat().st_mtime
        if mtime != self._cached[0]:
            self._cached = (mtime, images.load_table(self.path))
        return self._cached[1]


def _memory_cgroups(node_name: str) -> MemoryCgroups | None:
    cgroups = MemoryCgroups.detect(f"kubetune-nodeagent-{node_name}")
    if cgroups is None:
        log.warning("no memory cgroups available: memory limits are not enforced")
        return None
    return cgroups if cgroups.prepare() else None


def _oci_runtime(settings: AgentSettings) -> OciRuntime | None:
    if settings.runtime != "oci":
        return None
    if settings.image_store is None:
        raise ValueError("the OCI runtime needs an image store (--image-store)")
    state = settings.state_dir / "oci"
    state.mkdir(parents=True, exist_ok=True)
    store = ImageStore(settings.image_store / "root", settings.storage_driver)
    log.info("OCI mode: %s, images from %s (%s)", settings.oci_runtime, store.root, store.driver)
    return OciRuntime(
        store=store,
        runtime=settings.oci_runtime,
        state_dir=state,
        seccomp_root=settings.state_dir / "seccomp",
    )


def has_run(pod: JSON) -> bool:
    """Whether some container of ``pod`` was started (by an earlier agent)."""
    status = pod.get("status", {})
    if status.get("phase") == "Running":
        return True
    statuses = [*(status.get("containerStatuses") or []), *(status.get("initContainerStatuses") or [])]
    return any(
        "running" in (s.get("state") or {}) or "terminated" in (s.get("state") or {}) for s in statuses
    )


class Agent:
    def __init__(self, kube: Kube, shape: NodeShape, settings: AgentSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.node_name = shape.name
        self.registration = NodeRegistration(kube, shape)
        self.binder = Binder(kube, shape.name, settings.scheduler_name)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self.done: set[str] = set()
        self.ctx = AgentContext(
            kube=kube,
            node_name=shape.name,
            state_dir=settings.state_dir,
            image_table=ImageTable(settings.image_table),
            node=lambda: self.registration.node,
            restart_backoff=settings.restart_backoff,
            cgroups=_memory_cgroups(shape.name) if settings.memory_limits else None,
            oci=_oci_runtime(settings),
        )

    # -- threads -------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.settings.heartbeat):
            try:
                self.registration.heartbeat()
            except Exception as exc:
                log.warning("heartbeat: %s", exc)

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
        items: list[JSON] = self.kube.request(
            "GET", "/api/v1/pods", params={"fieldSelector": field_selector}
        )["items"]
        return items

    def reconcile(self) -> None:
        node = self.registration.refresh()
        mine = self._list(f"spec.nodeName={self.node_name}")
        self._sync_own_pods(mine)
        if self.settings.bind:
            pending = self._list("spec.nodeName=,status.phase=Pending")
            if self.binder.schedule(pending, node, mine):
                self.wake.set()  # pick them up as ours right away

    def _admit(self, pod: JSON) -> PodWorker:
        meta = pod["metadata"]
        worker = PodWorker(self.ctx, pod, lost=has_run(pod))
        self.workers[str(meta["uid"])] = worker
        log.info("pod %s/%s: admitted", meta["namespace"], meta["name"])
        worker.start()
        return worker

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
                worker = self._admit(pod)
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
        except KubeError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: delete: %s", meta["namespace"], meta["name"], exc)

    # -- main loop -----------------------------------------------------------------
    def run(self) -> None:
        self.registration.register()
        watches = {"watch-own": f"spec.nodeName={self.node_name}"}
        if self.settings.bind:
            watches["watch-pending"] = "spec.nodeName="
        threads = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)]
        threads += [
            threading.Thread(target=self._watch_loop, args=(selector,), name=name, daemon=True)
            for name, selector in watches.items()
        ]
        for thread in threads:
            thread.start()
        log.info("node agent for %s running (state in %s)", self.node_name, self.settings.state_dir)
        while not self.stop.is_set():
            try:
                self.reconcile()
            except urllib3.exceptions.HTTPError as exc:  # no answer (an API server restarting)
                log.warning("reconcile: API server unreachable, retrying in %.0fs: %s", RESYNC_SECONDS, exc)
            except Exception:
                log.exception("reconcile failed")
            self.wake.wait(RESYNC_SECONDS)
            self.wake.clear()
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every pod (bounded by the shutdown grace) and report the node NotReady."""
        grace = self.settings.shutdown_grace
        log.info("shutting down: stopping %d pod(s)", len(self.workers))
        for worker in self.workers.values():
            worker.request_stop(grace, delete_object=False, shutdown=True)
        deadline = time.monotonic() + grace + 3
        for worker in self.workers.values():
            worker.join(max(0.1, deadline - time.monotonic()))
        if self.ctx.cgroups is not None:
            self.ctx.cgroups.close()
        try:
            self.registration.report_not_ready()
        except Exception as exc:
            log.warning("could not report the node NotReady: %s", exc)
