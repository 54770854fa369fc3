"""The node agent's pure rules: image table, scheduling fit, quantities, $(VAR) expansion."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from kubetune_nodeagent import images
from kubetune_nodeagent.podspec import expand
from kubetune_nodeagent.scheduling import parse_quantity, pod_requests, unfit_reason

JSON = dict[str, Any]


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("busybox", "docker.io/library/busybox"),
        ("busybox:1.36", "docker.io/library/busybox"),
        ("library/busybox@sha256:abc", "docker.io/library/busybox"),
        ("ghcr.io/kubetune/trainer:0.1.0", "ghcr.io/kubetune/trainer"),
        ("localhost:5000/x/y:tag", "localhost:5000/x/y"),
        ("someuser/tool", "docker.io/someuser/tool"),
    ],
)
def test_image_normalisation(image: str, repository: str) -> None:
    assert images.normalize(image) == repository


def test_default_table_maps_trainer_to_project_env_and_rejects_unknown() -> None:
    table = images.load_table(images.DEFAULT_TABLE)
    trainer = images.resolve(table, "ghcr.io/kubetune/trainer:latest")
    assert trainer is not None
    venv_bin = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    assert trainer.path_env().split(":")[0] == str(venv_bin)
    busybox = images.resolve(table, "busybox:1.36")
    assert busybox is not None
    assert busybox.cmd == ("sh",)
    assert images.resolve(table, "registry.invalid/nope:1") is None


def test_table_patterns_and_relative_paths(tmp_path: Path) -> None:
    table_file = tmp_path / "images.yaml"
    table_file.write_text("images:\n  - match: 'example.com/team/*'\n    path: [bin]\n  - match: '*'\n")
    table = images.load_table(table_file)
    rule = images.resolve(table, "example.com/team/app:1")
    assert rule is not None
    assert rule.path == (str(tmp_path / "bin"),)
    fallback = images.resolve(table, "quay.io/other:2")
    assert fallback is not None
    assert fallback.match == "*"


def test_quantities() -> None:
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity("1e3") == 1000
    assert parse_quantity("2") == 2
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity("1.5.5")


def _pod(uid: str, requests: JSON, *, init: JSON | None = None, **spec: Any) -> JSON:
    pod_spec: JSON = {"containers": [{"name": "c", "resources": {"requests": requests}}], **spec}
    if init is not None:
        pod_spec["initContainers"] = [{"name": "i", "resources": {"requests": init}}]
    return {"metadata": {"uid": uid, "name": uid}, "spec": pod_spec, "status": {"phase": "Pending"}}


NODE: JSON = {
    "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "zone": "a", "rank": "5"}},
    "spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]},
    "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "3", "nvidia.com/gpu": "1"}},
}
TOLERATE = [{"key": "gpu", "operator": "Exists"}]


def test_requests_take_the_larger_of_init_and_containers() -> None:
    assert pod_requests(_pod("a", {"cpu": "500m"}, init={"cpu": "1500m"}))["cpu"] == Fraction(3, 2)
    assert pod_requests(_pod("a", {"cpu": "2"}, init={"cpu": "1"}))["cpu"] == 2


def test_fit_counts_resources_of_running_pods_only() -> None:
    running = _pod("r", {"nvidia.com/gpu": "1"}, tolerations=TOLERATE)
    running["status"]["phase"] = "Running"
    finished = _pod("f", {"nvidia.com/gpu": "1"}, tolerations=TOLERATE)
    finished["status"]["phase"] = "Succeeded"
    wants_gpu = _pod("p", {"nvidia.com/gpu": "1", "cpu": "1"}, tolerations=TOLERATE)
    assert unfit_reason(wants_gpu, NODE, [finished]) is None
    assert unfit_reason(wants_gpu, NODE, [running, finished]) == "Insufficient nvidia.com/gpu"
    too_big = _pod("q", {"cpu": "3", "memory": "8Gi"}, tolerations=TOLERATE)
    assert unfit_reason(too_big, NODE, []) == "Insufficient cpu, Insufficient memory"


def test_fit_checks_taints_selectors_and_affinity() -> None:
    assert "untolerated taint" in str(unfit_reason(_pod("a", {}), NODE, []))
    wrong_value = [{"key": "gpu", "operator": "Equal", "value": "no", "effect": "NoSchedule"}]
    assert unfit_reason(_pod("a", {}, tolerations=wrong_value), NODE, []) is not None
    assert unfit_reason(_pod("a", {}, tolerations=TOLERATE, nodeSelector={"zone": "a"}), NODE, []) is None
    assert unfit_reason(_pod("a", {}, tolerations=TOLERATE, nodeSelector={"zone": "b"}), NODE, []) is not None

    def affinity(*expressions: JSON) -> JSON:
        terms = [{"matchExpressions": list(expressions)}]
        return {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        }

    fits = affinity(
        {"key": "zone", "operator": "In", "values": ["a", "c"]},
        {"key": "rank", "operator": "Gt", "values": ["3"]},
    )
    assert unfit_reason(_pod("a", {}, tolerations=TOLERATE, affinity=fits), NODE, []) is None
    misses = affinity({"key": "zone", "operator": "NotIn", "values": ["a"]})
    assert unfit_reason(_pod("a", {}, tolerations=TOLERATE, affinity=misses), NODE, []) is not None
    gated = _pod("a", {}, tolerations=TOLERATE, schedulingGates=[{"name": "queue"}])
    assert unfit_reason(gated, NODE, []) == "pod has scheduling gates"


def test_var_expansion() -> None:
    env = {"A": "x", "B": "y"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "x-y-$(C)-$(A)"
