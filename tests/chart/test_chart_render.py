"""``helm lint`` and ``helm template`` of charts/kubetune with the Go-built helm v4.

Default values (cluster-wide mode, 2 replicas, peering), non-default values (namespace-scoped
mode, digests, ServiceMonitor, one replica) and values the schema must reject.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, KUBE_VERSION, REPO_ROOT, Helm, container_env, find, one

NAMESPACED_VERBS = {
    ("kubetune.dev", "finetunejobs"): {"get", "list", "watch", "patch", "create"},
    ("kubetune.dev", "finetunejobs/status"): {"get", "patch"},
    ("kubetune.dev", "finetunejobs/finalizers"): {"update"},
    ("kubetune.dev", "finetunesweeps"): {"get", "list", "watch", "patch"},
    ("kubetune.dev", "finetunesweeps/status"): {"get", "patch"},
    ("kubetune.dev", "finetunesweeps/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "configmaps"): {"get", "create"},
    ("", "serviceaccounts"): {"get", "create"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create"},
    ("", "events"): {"create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create"},
    ("kueue.x-k8s.io", "workloads"): {"list", "patch"},
}


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over all rules."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_helm_lint_strict(helm: Helm) -> None:
    proc = helm.run("lint", "--strict", str(CHART_DIR), "--kube-version", KUBE_VERSION)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_helm_lint_namespace_scoped(helm: Helm) -> None:
    proc = helm.run(
        "lint",
        "--strict",
        str(CHART_DIR),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "watchNamespaces={ml,research}",
    )
    assert "0 chart(s) failed" in proc.stdout


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _comment_above(lines: list[str], index: int) -> str | None:
    """The first line of the comment block right above ``lines[index]``, if any."""
    start = index
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    return lines[start].strip() if start < index else None


def test_every_value_is_commented() -> None:
    """Each key in values.yaml has a comment right above it, unless it sits inside a value
    documented as a whole (a "# -- " comment above an ancestor, e.g. resources or securityContext)."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith(("#", "-"))]
    assert len(keys) > 50
    for index in keys:
        if _comment_above(lines, index):
            continue
        ancestor, documented = index, False
        while _indent(lines[ancestor]) > 0 and not documented:
            ancestor = next(
                j
                for j in range(ancestor - 1, -1, -1)
                if j in keys and _indent(lines[j]) < _indent(lines[ancestor])
            )
            documented = (_comment_above(lines, ancestor) or "").startswith("# --")
        assert documented, f"values.yaml:{index + 1} {lines[index].strip()!r} has no comment"


def test_default_render(helm: Helm) -> None:
    objects = helm.template()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )
    crds = {o["metadata"]["name"] for o in find(objects, "CustomResourceDefinition")}
    assert crds == {
        "finetunejobs.kubetune.dev",
        "finetunesweeps.kubetune.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    assert not find(objects, "Role")
    assert not find(objects, "RoleBinding")

    deploy = one(objects, "Deployment", "kt-kubetune")
    assert deploy["metadata"]["namespace"] == "kubetune-system"
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "kt-kubetune"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"]["memory"] == "256Mi"
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert container["resources"]["limits"]["cpu"] == "1"
    assert container_env(deploy) == {
        "KUBETUNE_NAMESPACES": "",
        "KUBETUNE_TRAINER_IMAGE": "ghcr.io/kubetune/trainer:0.1.0",
        "KUBETUNE_METRICS_PORT": "8080",
        "KUBETUNE_HEALTH_PORT": "8081",
        "KUBETUNE_PEERING": "kubetune",
    }

    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "kubetune"
    role = one(objects, "ClusterRole", "kt-kubetune")
    granted = grants(role["rules"])
    for key, verbs in NAMESPACED_VERBS.items():
        assert granted[key] == verbs, key
    assert granted[("apiextensions.k8s.io", "customresourcedefinitions")] == {"get", "list", "watch"}
    assert granted[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    assert ("", "secrets") not in granted
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])
    assert not any({"escalate", "bind", "impersonate"} & set(r["verbs"]) for r in role["rules"])
    binding = one(objects, "ClusterRoleBinding", "kt-kubetune")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}
    ]

    service = one(objects, "Service", "kt-kubetune-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_namespace_scoped_render(helm: Helm) -> None:
    objects = helm.template(
        "--set",
        "watchNamespaces={ml,research}",
        "--set",
        "replicaCount=1",
        "--set",
        "image.digest=sha256:" + "a" * 64,
        "--set",
        "trainer.image.tag=2.0.0",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "podDisruptionBudget.enabled=true",
        release="ml",
        namespace="ops",
    )
    deploy = one(objects, "Deployment", "ml-kubetune")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert deploy["spec"]["replicas"] == 1
    assert container["image"] == "ghcr.io/kubetune/operator@sha256:" + "a" * 64
    env = container_env(deploy)
    assert env["KUBETUNE_NAMESPACES"] == "ml,research"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:2.0.0"

    # One Role/RoleBinding/KopfPeering per watched namespace; no ClusterKopfPeering.
    roles = find(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    for role in roles:
        granted = grants(role["rules"])
        for key, verbs in NAMESPACED_VERBS.items():
            assert granted[key] == verbs, key
        assert granted[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-kubetune", "namespace": "ops"}]
    assert sorted(p["metadata"]["namespace"] for p in find(objects, "KopfPeering")) == ["ml", "research"]
    assert not find(objects, "ClusterKopfPeering")

    # The cluster-scoped part shrinks to CRD and namespace discovery: no workload access.
    cluster_role = one(objects, "ClusterRole")
    assert grants(cluster_role["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }

    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ops"]}
    # One replica: no PodDisruptionBudget (it would block every node drain).
    assert not find(objects, "PodDisruptionBudget")


def test_optional_objects_can_be_turned_off(helm: Helm) -> None:
    objects = helm.template(
        "--set",
        "metrics.service.enabled=false",
        "--set",
        "networkPolicy.enabled=false",
        "--set",
        "podDisruptionBudget.enabled=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=existing-sa",
        "--set",
        "rbac.create=false",
    )
    kinds = {o["kind"] for o in objects}
    assert kinds.isdisjoint(
        {"Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "ClusterRole"}
    )
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"


def test_notes_tell_what_to_do_next(helm: Helm) -> None:
    proc = helm.run(
        "install",
        "kt",
        str(CHART_DIR),
        "--dry-run=client",
        "--namespace",
        "ops",
    )
    assert "Mode: cluster-wide" in proc.stdout
    assert "kubectl -n ops rollout status deployment/kt-kubetune" in proc.stdout
    assert "kubectl get ftj" in proc.stdout
    for path in ("examples/finetunejob.yaml", "hack/argocd/finetunejob-health.lua", "docs/install.md"):
        assert path in proc.stdout
        assert (REPO_ROOT / path).exists(), f"NOTES.txt points at {path}, which does not exist"
    proc = helm.run(
        "install",
        "kt",
        str(CHART_DIR),
        "--dry-run=client",
        "--namespace",
        "ops",
        "--set",
        "watchNamespaces={ml}",
    )
    assert "Mode: namespace-scoped. The operator watches FineTuneJobs only in: ml" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "replicaCount=0"], "/replicaCount"),
        (["--set", "replicaCount=two"], "/replicaCount"),
        (["--set", "watchNamespaces={Bad_NS}"], "/watchNamespaces/0"),
        (["--set", "watchNamespaces={ml,ml}"], "/watchNamespaces"),
        (["--set", "image.tag=1.0 beta"], "/image/tag"),
        (["--set", "image.digest=sha256:nothex"], "/image/digest"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "metrics.port=80"], "/metrics/port"),
        (["--set", "health.port=70000"], "/health/port"),
        (["--set", "replicas=2"], "replicas"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
        (
            ["--set", "securityContext.allowPrivilegeEscalation=true"],
            "/securityContext/allowPrivilegeEscalation",
        ),
        (["--set", "resources.requests.memory=lots"], "/resources/requests/memory"),
        (["--set", "metrics.serviceMonitor.interval=30"], "/metrics/serviceMonitor/interval"),
        (["--set", "extraEnv[0].name=1NVALID"], "/extraEnv/0/name"),
        (["--set", "peering.name=Not Valid"], "/peering/name"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, flags: list[str], message: str) -> None:
    proc = helm.run("template", "kt", str(CHART_DIR), "--kube-version", KUBE_VERSION, *flags, check=False)
    assert proc.returncode != 0, f"{flags} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "peering.enabled=false"], "replicaCount > 1 needs peering.enabled=true"),
        (
            ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"],
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        (["--set", "image.tag=latest"], 'image.tag "latest" is not allowed: pin a version'),
        (["--set", "trainer.image.tag=latest"], 'trainer.image.tag "latest" is not allowed'),
        (
            ["--set", "extraEnv[0].name=KUBETUNE_NAMESPACES", "--set", "extraEnv[0].value=x"],
            "extraEnv must not set KUBETUNE_NAMESPACES",
        ),
        (
            ["--set", "serviceAccount.create=false"],
            "serviceAccount.name is required when serviceAccount.create is false",
        ),
    ],
)
def test_template_guards_reject_inconsistent_values(helm: Helm, flags: list[str], message: str) -> None:
    proc = helm.run("template", "kt", str(CHART_DIR), "--kube-version", KUBE_VERSION, *flags, check=False)
    assert proc.returncode != 0, f"{flags} was accepted"
    assert message in proc.stderr, proc.stderr


def test_kube_version_floor(helm: Helm) -> None:
    proc = helm.run("template", "kt", str(CHART_DIR), "--kube-version", "1.29.9", check=False)
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr or ">=1.30.0-0" in proc.stderr, proc.stderr


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"] == ">=1.30.0-0"
    assert chart["name"] == "kubetune"


def test_trainer_network_policy_reaches_the_operator_and_its_children(helm: Helm) -> None:
    """values -> KUBETUNE_TRAINER_EGRESS -> the operator's config -> each job's NetworkPolicy."""
    from kubetune_operator import builders
    from kubetune_operator.settings import from_env

    minio = [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}]}]
    objects = helm.template(
        "--set",
        "trainerNetworkPolicy.enabled=true",
        "--set-json",
        f"trainerNetworkPolicy.objectStore={json.dumps(minio)}",
    )
    env = container_env(one(objects, "Deployment", "kt-kubetune"))
    config = from_env({"KUBETUNE_TRAINER_EGRESS": env["KUBETUNE_TRAINER_EGRESS"]})
    assert config.trainer_egress is not None
    assert list(config.trainer_egress["objectStore"]) == minio

    def ftj(source: str) -> dict[str, Any]:
        spec = {
            "model": {"source": source},
            "dataset": {"train": "s3://data/t.jsonl"},
            "output": {"uri": "s3://out/run"},
        }
        return {"metadata": {"name": "run", "namespace": "ml", "uid": "u1"}, "spec": spec}

    from_s3 = builders.network_policy(ftj("s3://models/llama"), config.trainer_egress)["spec"]
    from_hub = builders.network_policy(ftj("meta-llama/Llama-3.2-1B"), config.trainer_egress)["spec"]
    assert from_s3["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in from_s3  # nothing may connect to a trainer
    assert from_s3["podSelector"] == {"matchLabels": {"kubetune.dev/finetunejob": "run"}}
    dns_ports = {(p["port"], p["protocol"]) for p in from_s3["egress"][0]["ports"]}
    assert dns_ports == {(53, "UDP"), (53, "TCP")}
    assert from_s3["egress"][1:] == minio  # no API server peers given, no hub for an s3 model
    assert from_hub["egress"][-1]["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "KUBETUNE_TRAINER_EGRESS" not in container_env(one(helm.template(), "Deployment", "kt-kubetune"))
