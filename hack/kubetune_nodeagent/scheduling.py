"""Scheduling on the node agent's node: does a pending pod fit (pure rules), and binding it.

Supported (the rest of the scheduler's rules are ignored, see docs/nodeagent.md):

* resource requests (every resource, including extended ones such as
  ``nvidia.com/gpu``) against allocatable minus the requests of the node's
  non-terminal pods; a pod's request is max(sum of containers + sidecars,
  largest init container) + overhead; the ``pods`` count;
* ``spec.nodeSelector``;
* ``requiredDuringSchedulingIgnoredDuringExecution`` node affinity
  (matchExpressions In/NotIn/Exists/DoesNotExist/Gt/Lt on labels, matchFields on
  ``metadata.name``);
* tolerations against the node's NoSchedule and NoExecute taints;
* ``spec.schedulingGates`` (a gated pod is left alone).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from kubetune_api.status import rfc3339
from kubetune_operator.kube import STRATEGIC_MERGE_PATCH, Kube, KubeError

JSON = dict[str, Any]
log = logging.getLogger("nodeagent")

_SUFFIXES = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[a-zA-Z]*)$")


def parse_quantity(value: object) -> Fraction:
    """A Kubernetes resource quantity ("500m", "1Gi", "2", "1e3") as an exact number."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"invalid quantity {text!r}")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E"):
        return Fraction(number) * Fraction(10) ** int(suffix[1:])
    if suffix not in _SUFFIXES:
        raise ValueError(f"invalid quantity suffix in {text!r}")
    return Fraction(number) * _SUFFIXES[suffix]


def _add(total: dict[str, Fraction], resources: dict[str, Any] | None) -> None:
    for name, value in (resources or {}).items():
        total[name] = total.get(name, Fraction(0)) + parse_quantity(value)


def pod_requests(pod: JSON) -> dict[str, Fraction]:
    """What the scheduler would charge the node for ``pod``."""
    spec = pod.get("spec", {})
    total: dict[str, Fraction] = {}
    for container in spec.get("containers", []):
        _add(total, container.get("resources", {}).get("requests"))
    init_peak: dict[str, Fraction] = {}
    sidecars: dict[str, Fraction] = {}
    for init in spec.get("initContainers", []):
        requests = init.get("resources", {}).get("requests") or {}
        if init.get("restartPolicy") == "Always":  # a sidecar keeps running next to the containers
            _add(sidecars, requests)
            continue
        for name, value in requests.items():
            # an init container runs next to the sidecars started before it
            need = parse_quantity(value) + sidecars.get(name, Fraction(0))
            init_peak[name] = max(init_peak.get(name, Fraction(0)), need)
    for name, value in sidecars.items():
        total[name] = total.get(name, Fraction(0)) + value
    for name, peak in init_peak.items():
        total[name] = max(total.get(name, Fraction(0)), peak)
    _add(total, spec.get("overhead"))
    return total


def _expression_matches(expr: JSON, value: str | None) -> bool:
    operator = expr.get("operator")
    values = [str(v) for v in expr.get("values") or []]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            left, right = int(value), int(values[0])
        except ValueError:
            return False
        return left > right if operator == "Gt" else left < right
    return False


def _term_matches(term: JSON, labels: dict[str, str], node_name: str) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches nothing
    for expr in expressions:
        if not _expression_matches(expr, labels.get(str(expr.get("key")))):
            return False
    for expr in fields:
        value = node_name if expr.get("key") == "metadata.name" else None
        if not _expression_matches(expr, value):
            return False
    return True


def node_affinity_matches(pod: JSON, node: JSON) -> bool:
    labels: dict[str, str] = node["metadata"].get("labels") or {}
    name = str(node["metadata"]["name"])
    selector = pod.get("spec", {}).get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = ((pod.get("spec", {}).get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    return any(_term_matches(term, labels, name) for term in terms)


def _tolerates(toleration: JSON, taint: JSON) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    key = toleration.get("key")
    if toleration.get("operator") == "Exists":
        return not key or key == taint.get("key")
    return bool(key == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or ""))


def untolerated_taint(pod: JSON, taints: Iterable[JSON]) -> JSON | None:
    """The first NoSchedule/NoExecute taint that ``pod`` does not tolerate, if any."""
    tolerations = pod.get("spec", {}).get("tolerations") or []
    for taint in taints:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            return taint
    return None


def is_terminal(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def unfit_reason(pod: JSON, node: JSON, node_pods: Iterable[JSON]) -> str | None:
    """Why ``pod`` cannot be bound to ``node`` (which runs ``node_pods``), or None if it fits."""
    if pod.get("spec", {}).get("schedulingGates"):
        return "pod has scheduling gates"
    if not node_affinity_matches(pod, node):
        return "node(s) didn't match Pod's node affinity/selector"
    taint = untolerated_taint(pod, node.get("spec", {}).get("taints") or [])
    if taint is not None:
        return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    allocatable = {k: parse_quantity(v) for k, v in node.get("status", {}).get("allocatable", {}).items()}
    used: dict[str, Fraction] = {}
    count = 0
    for other in node_pods:
        if is_terminal(other) or other["metadata"]["uid"] == pod["metadata"]["uid"]:
            continue
        count += 1
        for name, value in pod_requests(other).items():
            used[name] = used.get(name, Fraction(0)) + value
    if "pods" in allocatable and count + 1 > allocatable["pods"]:
        return "Too many pods"
    missing = [
        name
        for name, value in sorted(pod_requests(pod).items())
        if value > 0 and value + used.get(name, Fraction(0)) > allocatable.get(name, Fraction(0))
    ]
    if missing:
        return ", ".join(f"Insufficient {name}" for name in missing)
    return None


# -- binding -----------------------------------------------------------------------------------
class Binder:
    """Binds the pending pods that fit on this node, and marks the others Unschedulable (once)."""

    def __init__(self, kube: Kube, node_name: str, scheduler_name: str) -> None:
        self.kube = kube
        self.node_name = node_name
        self.scheduler_name = scheduler_name
        self.unschedulable: dict[str, str] = {}

    def schedule(self, pending: list[JSON], node: JSON, bound: list[JSON]) -> int:
        """Bind what fits, oldest first; returns how many pods were bound."""
        pending = sorted(pending, key=lambda p: str(p["metadata"].get("creationTimestamp", "")))
        placed = list(bound)
        count = 0
        for pod in pending:
            meta, spec = pod["metadata"], pod["spec"]
            if spec.get("schedulerName", "default-scheduler") != self.scheduler_name or meta.get(
                "deletionTimestamp"
            ):
                continue
            reason = unfit_reason(pod, node, placed)
            if reason is not None:
                self._mark_unschedulable(pod, reason)
                continue
            try:
                self._bind(pod)
            except KubeError as exc:
                log.info("pod %s/%s: bind: %s", meta["namespace"], meta["name"], exc)
                continue
            placed.append(pod)
            count += 1
        return count

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
            "lastTransitionTime": rfc3339(),
        }
        body = {"metadata": {"uid": meta["uid"]}, "status": {"conditions": [condition]}}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        try:
            self.kube.request("PATCH", path, body, content_type=STRATEGIC_MERGE_PATCH)
        except KubeError as exc:
            log.info("pod %s/%s: unschedulable status: %s", meta["namespace"], meta["name"], exc)
            return
        self.unschedulable[str(meta["uid"])] = message
