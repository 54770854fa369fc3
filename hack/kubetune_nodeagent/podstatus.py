"""A pod's status as the kubelet reports it: phase, conditions, container statuses, and the patch.

:func:`pod_phase` is a pure function of the containers' states; :class:`StatusReporter`
remembers condition transition times and what was last sent, so the pod's status is patched
only when it changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kubetune_api.status import rfc3339
from kubetune_operator.kube import STRATEGIC_MERGE_PATCH, Kube, KubeError

from .containers import ContainerRun

JSON = dict[str, Any]
LOCAL_IP = "127.0.0.1"
RETRY_SECONDS = 2.0

log = logging.getLogger("nodeagent")


@dataclass
class PodState:
    """What the worker knows about its pod, as far as status is concerned."""

    init_runs: list[ContainerRun]
    runs: list[ContainerRun]
    start_time: str
    initialized: bool = False
    volumes_ready: bool = False
    terminating: bool = False
    shutdown: bool = False
    #: (reason, message) of a pod that failed as a whole (a failed init container, a lost pod).
    failure: tuple[str, str] | None = None


def pod_phase(state: PodState) -> str:
    """Pending, Running, Succeeded or Failed, from the containers' states."""
    if state.failure is not None or (state.shutdown and state.terminating):
        return "Failed"
    if not state.initialized and not state.terminating:
        return "Pending"
    states = [r.state for r in state.runs]
    if any("running" in s for s in states):
        return "Running"
    if all("terminated" in s for s in states):
        return "Succeeded" if all(s["terminated"].get("exitCode") == 0 for s in states) else "Failed"
    if state.terminating:
        return "Failed"  # deleted before every container ran
    ever_ran = any(r.restart_count or r.last_state for r in state.runs)
    return "Running" if ever_ran else "Pending"


def is_finished(state: PodState) -> bool:
    return pod_phase(state) in ("Succeeded", "Failed")


@dataclass
class StatusReporter:
    """Builds the pod's status and patches it when it changed."""

    kube: Kube
    namespace: str
    name: str
    uid: str
    _transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    _last_sent: JSON | None = None
    _retry_at: float = 0.0

    def _condition(self, kind: str, ok: bool, reason: str = "") -> JSON:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, rfc3339())
        condition: JSON = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }
        if reason:
            condition["reason"] = reason
        return condition

    def _conditions(self, state: PodState, terminal: bool) -> list[JSON]:
        all_running = bool(state.runs) and all(r.running for r in state.runs)
        ready_reason = "PodCompleted" if terminal else ("" if all_running else "ContainersNotReadyError")
        initialized_reason = "" if state.initialized else "ContainersNotInitialized"
        return [
            self._condition("PodReadyToStartContainers", state.volumes_ready and not terminal),
            self._condition("Initialized", state.initialized, initialized_reason),
            self._condition("Ready", all_running and not terminal, ready_reason),
            self._condition("ContainersReady", all_running and not terminal, ready_reason),
            self._condition("PodScheduled", True),
        ]

    def status(self, state: PodState) -> JSON:
        phase = pod_phase(state)
        status: JSON = {
            "phase": phase,
            "conditions": self._conditions(state, phase in ("Succeeded", "Failed")),
            "hostIP": LOCAL_IP,
            "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}],
            "startTime": state.start_time,
            "containerStatuses": [r.status() for r in state.runs],
        }
        if state.init_runs:
            status["initContainerStatuses"] = [r.status() for r in state.init_runs]
        if state.failure is not None:
            if state.failure[0]:
                status["reason"] = state.failure[0]
            status["message"] = state.failure[1]
        elif state.shutdown and state.terminating:
            status["reason"] = "Terminated"
            status["message"] = "Pod was terminated in response to imminent node shutdown."
        return status

    def publish(self, state: PodState, *, final: bool = False) -> bool:
        """Patch the pod's status if it changed; False when the pod is gone (or was replaced)."""
        status = self.status(state)
        if status == self._last_sent or (time.monotonic() < self._retry_at and not final):
            return True
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        body = {"metadata": {"uid": self.uid}, "status": status}
        try:
            self.kube.request("PATCH", path, body, content_type=STRATEGIC_MERGE_PATCH)
        except KubeError as exc:
            if exc.status in (404, 409):
                return False
            log.warning("pod %s/%s: status: %s", self.namespace, self.name, exc)
            self._retry_at = time.monotonic() + RETRY_SECONDS
            return True
        except Exception as exc:  # the API server may be briefly unreachable; retry soon
            log.warning("pod %s/%s: status: %s", self.namespace, self.name, exc)
            self._retry_at = time.monotonic() + RETRY_SECONDS
            return True
        self._last_sent = status
        return True
