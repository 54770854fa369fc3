"""The agent's Node: registration, status (capacity, conditions, node info), Lease heartbeats."""

from __future__ import annotations

import logging
import platform
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kubetune_api.status import rfc3339
from kubetune_operator.kube import MERGE_PATCH, Kube, KubeError

JSON = dict[str, Any]
DEFAULT_NODE_NAME = "kubetune-local"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
EXTENDED_GPU = "nvidia.com/gpu"

log = logging.getLogger("nodeagent")


@dataclass(frozen=True)
class NodeShape:
    """What the Node advertises (from the agent's command line)."""

    name: str
    cpu: str
    memory: str
    pods: int
    gpus: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)

    def resources(self) -> JSON:
        resources: JSON = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "100Gi",
        }
        if self.gpus:
            resources[EXTENDED_GPU] = str(self.gpus)
        return resources


def _architecture() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class NodeRegistration:
    """Registers the Node, keeps it Ready (status and Lease) and reports it NotReady on shutdown."""

    def __init__(self, kube: Kube, shape: NodeShape) -> None:
        self.kube = kube
        self.shape = shape
        self.node: JSON = {}
        self._since = rfc3339()
        self._boot_id = str(uuid.uuid4())

    @property
    def status_path(self) -> str:
        return f"/api/v1/nodes/{self.shape.name}/status"

    def conditions(self, ready: bool, reason: str, message: str) -> list[JSON]:
        now = rfc3339()
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

    def status(self) -> JSON:
        resources = self.shape.resources()
        name = self.shape.name
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": self.conditions(
                True, "KubeletReady", "kubetune node agent is posting ready status"
            ),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "kubetune node agent",
                "containerRuntimeVersion": "nodeagent://0.1.0",
                "kubeletVersion": "v0.0.0-nodeagent",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _architecture(),
            },
        }

    def register(self) -> None:
        """Create (or update) the Node, post its status and take its Lease."""
        name = self.shape.name
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": _architecture(),
            "node.kubernetes.io/instance-type": "kubetune-local",
            **self.shape.labels,
        }
        meta: JSON = {"name": name, "labels": labels}
        spec: JSON = {"taints": list(self.shape.taints), "unschedulable": False}
        try:
            self.kube.request(
                "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec}
            )
            log.info("registered node %s", name)
        except KubeError as exc:
            if exc.status != 409:
                raise
            patch = {"metadata": meta, "spec": spec}
            self.kube.request("PATCH", f"/api/v1/nodes/{name}", patch, content_type=MERGE_PATCH)
            log.info("node %s already registered; updated it", name)
        self.node = self.kube.request(
            "PATCH", self.status_path, {"status": self.status()}, content_type=MERGE_PATCH
        )
        self.renew_lease()

    def renew_lease(self) -> None:
        name = self.shape.name
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}"
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}
        try:
            self.kube.request("PATCH", path, {"spec": spec}, content_type=MERGE_PATCH)
        except KubeError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node["metadata"]["uid"]}
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [owner]},
                "spec": spec,
            }
            self.kube.request("POST", path.rsplit("/", 1)[0], lease)

    def heartbeat(self) -> None:
        """Renew the Lease and refresh the Ready condition."""
        self.renew_lease()
        body = {"status": {"conditions": self.status()["conditions"]}}
        self.kube.request("PATCH", self.status_path, body, content_type=MERGE_PATCH)

    def refresh(self) -> JSON:
        """The Node as the API server has it now (labels, taints, allocatable)."""
        self.node = self.kube.request("GET", f"/api/v1/nodes/{self.shape.name}")
        return self.node

    def report_not_ready(self) -> None:
        conditions = self.conditions(False, "NodeAgentStopped", "the kubetune node agent stopped")
        body = {"status": {"conditions": conditions}}
        self.kube.request("PATCH", self.status_path, body, content_type=MERGE_PATCH, timeout=3)
