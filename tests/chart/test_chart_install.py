"""helm install / upgrade / uninstall of charts/kubetune into the real local control plane.

The control plane here (etcd, kube-apiserver, kube-controller-manager) has no node, so the
operator pods are created but never run (``make demo`` runs them through the node agent):
these tests check what the API server accepts and stores, the CRDs, and the RBAC the
operator's ServiceAccount really gets (``kubectl auth can-i`` and real requests made while
impersonating it).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, REPO_ROOT, Helm, Kubectl

pytestmark = pytest.mark.cluster

FTJ = "finetunejobs.kubetune.dev"
SWEEP = "finetunesweeps.kubetune.dev"
EXAMPLE_FTJ = REPO_ROOT / "examples" / "argocd" / "finetunejobs" / "alpaca-qlora.yaml"


def install(helm: Helm, release: str, namespace: str, *flags: str) -> None:
    helm.run("install", release, str(CHART_DIR), "--namespace", namespace, *flags)


def deployment_env(kubectl: Kubectl, namespace: str, name: str) -> dict[str, str]:
    deploy = kubectl.json("-n", namespace, "get", "deployment", name)
    env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", "") for e in env}


def wait_for_pods(
    kubectl: Kubectl, namespace: str, release: str, count: int, timeout: float = 90
) -> list[Any]:
    """The release's operator pods, once the ReplicaSet controller has created ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        pods: list[Any] = kubectl.json(
            "-n", namespace, "get", "pods", "-l", f"app.kubernetes.io/instance={release}"
        )["items"]
        if len(pods) >= count:
            return pods
        if time.monotonic() > deadline:
            events = kubectl.ok("-n", namespace, "get", "events", "--field-selector", "reason=FailedCreate")
            raise AssertionError(
                f"{len(pods)}/{count} operator pods after {timeout}s; FailedCreate events:\n{events}"
            )
        time.sleep(1)


def apply_example_ftj(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    """Apply the GitOps example FineTuneJob in ``namespace``; return it as stored."""
    manifest = yaml.safe_load(EXAMPLE_FTJ.read_text())
    manifest["metadata"]["namespace"] = namespace
    kubectl.ok("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(manifest))
    stored: dict[str, Any] = kubectl.json("-n", namespace, "get", FTJ, manifest["metadata"]["name"])
    return stored


def role_for_one_job(namespace: str, job: str, extra_rules: list[dict[str, Any]] | None = None) -> str:
    """The per-job Role and RoleBinding the operator creates for a trainer (its own builders)."""
    from kubetune_operator import builders

    spec = {
        "model": {"source": "org/model"},
        "dataset": {"train": "s3://data/t.jsonl"},
        "output": {"uri": "s3://out/run"},
    }
    ftj = {"metadata": {"name": job, "namespace": namespace, "uid": "0"}, "spec": spec}
    role, binding = builders.role(ftj), builders.role_binding(ftj)
    role["rules"] = [*role["rules"], *(extra_rules or [])]
    for obj in (role, binding):
        obj["metadata"].pop("ownerReferences")  # no such FineTuneJob: the GC would delete them
        obj["metadata"]["namespace"] = namespace
    return yaml.safe_dump_all([role, binding])


def assert_operator_rights(kubectl: Kubectl, sa: str, ns: str) -> None:
    """What the operator needs in a namespace it serves, and what it must not do there."""
    allowed = [
        ("list", FTJ),
        ("watch", FTJ),
        ("patch", FTJ),
        ("patch", FTJ, "--subresource=status"),
        ("create", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("delete", "jobs.batch"),  # spec.cancel
        ("create", FTJ),  # a FineTuneSweep's trials
        ("watch", SWEEP),
        ("patch", SWEEP),
        ("patch", SWEEP, "--subresource=status"),
        ("watch", "pods"),
        ("create", "configmaps"),
        ("create", "serviceaccounts"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("create", "events"),
    ]
    for verb, resource, *extra in allowed:
        assert kubectl.can_i(sa, verb, resource, "-n", ns, *extra), (
            f"operator cannot {verb} {resource} {extra} in {ns}"
        )
    denied = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("delete", FTJ),
        ("create", SWEEP),
        ("delete", SWEEP),
        ("update", SWEEP),
        ("update", FTJ),
        ("create", "pods"),
        ("delete", "pods"),
        ("create", "pods", "--subresource=exec"),
        ("get", "pods", "--subresource=log"),
        ("create", "deployments.apps"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
        ("bind", "roles.rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts"),
        ("delete", "configmaps"),
        ("patch", "configmaps"),
        ("list", "configmaps"),
        ("delete", "rolebindings.rbac.authorization.k8s.io"),
        ("patch", "roles.rbac.authorization.k8s.io"),
        ("create", "serviceaccounts", "--subresource=token"),
    ]
    for verb, resource, *extra in denied:
        assert not kubectl.can_i(sa, verb, resource, "-n", ns, *extra), (
            f"operator can {verb} {resource} {extra} in {ns}"
        )


def assert_per_job_rbac(kubectl: Kubectl, sa: str, ns: str) -> None:
    """Impersonating the operator: the per-job Role/RoleBinding is accepted without escalate/bind,
    and a Role that would hand out more than the operator holds (Secrets) is refused."""
    job = "j" + secrets.token_hex(3)
    proc = kubectl.run("apply", "-f", "-", stdin=role_for_one_job(ns, job), as_user=sa)
    assert proc.returncode == 0, proc.stderr
    greedy = role_for_one_job(
        ns, job + "x", [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    )
    proc = kubectl.run("apply", "-f", "-", stdin=greedy, as_user=sa)
    assert proc.returncode != 0
    assert "forbidden" in proc.stderr, proc.stderr
    assert "attempting to grant RBAC permissions not currently held" in proc.stderr, proc.stderr
    # The trainer's identity can touch only its own FineTuneJob's status.
    trainer = f"system:serviceaccount:{ns}:{job}-trainer"
    assert kubectl.can_i(trainer, "patch", f"{FTJ}/{job}", "-n", ns, "--subresource=status")
    assert not kubectl.can_i(trainer, "patch", f"{FTJ}/other", "-n", ns, "--subresource=status")
    assert not kubectl.can_i(trainer, "patch", f"{FTJ}/{job}", "-n", ns)
    assert not kubectl.can_i(trainer, "get", "secrets", "-n", ns)


def test_install_upgrade_uninstall_cluster_wide(cluster_helm: Helm, kubectl: Kubectl, namespace: str) -> None:
    release = "kt" + secrets.token_hex(3)
    peering = f"{release}-peering"
    # The restricted Pod Security Standard, enforced by the API server's PodSecurity admission.
    kubectl.ok("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    install(cluster_helm, release, namespace, "--set", f"peering.name={peering}")
    name = f"{release}-kubetune"
    sa = f"system:serviceaccount:{namespace}:{name}"

    # kube-controller-manager's ReplicaSet controller creates both pods: PodSecurity admitted
    # them under "restricted" (no kubelet runs here, so they stay Pending).
    pods = wait_for_pods(kubectl, namespace, release, 2)
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["serviceAccountName"] == name

    # The CRD is established and a FineTuneJob can be applied, with the schema's defaults filled in.
    kubectl.ok("wait", "--for=condition=Established", f"crd/{FTJ}", "--timeout=60s")
    for crd in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
        kubectl.ok("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    stored = apply_example_ftj(kubectl, namespace)
    assert stored["spec"]["method"] == "qlora"
    assert stored["spec"]["suspend"] is False

    # What the release created.
    assert kubectl.json("get", "clusterkopfpeering", peering)["metadata"]["name"] == peering
    env = deployment_env(kubectl, namespace, name)
    assert env["KUBETUNE_NAMESPACES"] == ""
    assert env["KUBETUNE_PEERING"] == peering
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    service = kubectl.json("-n", namespace, "get", "service", f"{name}-metrics")
    assert service["spec"]["ports"][0]["port"] == 8080
    kubectl.ok("-n", namespace, "get", "networkpolicy", name)
    kubectl.ok("-n", namespace, "get", "poddisruptionbudget", name)

    # RBAC: everything it needs in any namespace, nothing more; no Secrets anywhere.
    other = "default"
    for ns in (namespace, other):
        assert_operator_rights(kubectl, sa, ns)
    assert kubectl.can_i(sa, "list", FTJ, "--all-namespaces")
    assert kubectl.can_i(sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
    assert kubectl.can_i(sa, "patch", f"clusterkopfpeerings.kopf.dev/{peering}")
    assert not kubectl.can_i(sa, "patch", "clusterkopfpeerings.kopf.dev/someone-elses")
    assert not kubectl.can_i(sa, "list", "secrets", "--all-namespaces")
    assert not kubectl.can_i(sa, "create", "clusterroles.rbac.authorization.k8s.io")
    assert not kubectl.can_i(sa, "create", "clusterrolebindings.rbac.authorization.k8s.io")
    assert not kubectl.can_i(sa, "delete", "customresourcedefinitions.apiextensions.k8s.io")
    assert not kubectl.can_i(sa, "delete", "namespaces")
    assert not kubectl.can_i(sa, "list", "nodes")
    assert_per_job_rbac(kubectl, sa, namespace)

    # Upgrade: changed values reach the Deployment.
    cluster_helm.run(
        "upgrade",
        release,
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--reuse-values",
        "--set",
        "trainer.image.tag=9.9.9",
        "--set",
        "replicaCount=3",
    )
    env = deployment_env(kubectl, namespace, name)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:9.9.9"
    assert kubectl.json("-n", namespace, "get", "deployment", name)["spec"]["replicas"] == 3
    history = cluster_helm.run("history", release, "--namespace", namespace, "-o", "yaml").stdout
    assert [entry["revision"] for entry in yaml.safe_load(history)] == [1, 2]

    # Uninstall: the release's objects go; the CRD and the FineTuneJobs stay (helm never deletes CRDs).
    cluster_helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
    for kind, obj, scope in (
        ("deployment", name, ["-n", namespace]),
        ("serviceaccount", name, ["-n", namespace]),
        ("clusterrole", name, []),
        ("clusterrolebinding", name, []),
        ("clusterkopfpeering", peering, []),
    ):
        proc = kubectl.run("get", kind, obj, *scope)
        assert proc.returncode != 0, f"{kind}/{obj} survived uninstall"
        assert "NotFound" in proc.stderr, proc.stderr
    kubectl.ok("get", "crd", FTJ)
    kubectl.ok("-n", namespace, "get", FTJ, stored["metadata"]["name"])
    assert not kubectl.can_i(sa, "list", FTJ, "-n", namespace)


def test_install_namespace_scoped(
    cluster_helm: Helm, kubectl: Kubectl, namespace: str, watched_namespaces: list[str]
) -> None:
    release = "kt" + secrets.token_hex(3)
    ml, research = watched_namespaces
    install(
        cluster_helm,
        release,
        namespace,
        "--set",
        f"watchNamespaces={{{ml},{research}}}",
        "--set",
        "peering.name=kubetune",
    )
    name = f"{release}-kubetune"
    sa = f"system:serviceaccount:{namespace}:{name}"
    try:
        assert deployment_env(kubectl, namespace, name)["KUBETUNE_NAMESPACES"] == f"{ml},{research}"
        for ns in (ml, research):
            assert kubectl.json("-n", ns, "get", "kopfpeering", "kubetune")["metadata"]["namespace"] == ns
            assert kubectl.can_i(sa, "patch", "kopfpeerings.kopf.dev/kubetune", "-n", ns)
            assert_operator_rights(kubectl, sa, ns)
        assert_per_job_rbac(kubectl, sa, ml)
        stored = apply_example_ftj(kubectl, research)
        assert stored["metadata"]["namespace"] == research

        # Nothing outside the watched namespaces: not the release's own namespace, not elsewhere.
        for ns in (namespace, "default"):
            assert not kubectl.can_i(sa, "list", FTJ, "-n", ns)
            assert not kubectl.can_i(sa, "create", "jobs.batch", "-n", ns)
            assert not kubectl.can_i(sa, "create", "roles.rbac.authorization.k8s.io", "-n", ns)
        assert not kubectl.can_i(sa, "list", FTJ, "--all-namespaces")
        assert not kubectl.can_i(sa, "list", "secrets", "--all-namespaces")
        assert kubectl.can_i(sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        assert kubectl.can_i(sa, "list", "namespaces")
        assert not kubectl.can_i(sa, "list", "clusterkopfpeerings.kopf.dev")
    finally:
        cluster_helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
    for ns in (ml, research):
        proc = kubectl.run("-n", ns, "get", "role", name)
        assert proc.returncode != 0
        assert "NotFound" in proc.stderr


def test_crd_upgrade_path_documented_in_notes(cluster_helm: Helm, namespace: str, kubectl: Kubectl) -> None:
    """A second release in another namespace installs cleanly next to existing CRDs (helm skips
    CRDs that exist), and NOTES tell how to update CRDs, which helm upgrade never does."""
    kubectl.ok("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    release = "kt" + secrets.token_hex(3)
    proc = cluster_helm.run(
        "install", release, str(CHART_DIR), "--namespace", namespace, "--set", f"peering.name={release}"
    )
    try:
        assert "kubectl apply --server-side -f <chart>/crds/" in proc.stdout
        assert f"kubectl -n {namespace} rollout status deployment/{release}-kubetune" in proc.stdout
    finally:
        cluster_helm.run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")


def test_example_values_install(cluster_helm: Helm, namespace: str, tmp_path: Path) -> None:
    """The Flux HelmRelease's values are accepted by the chart (server-side dry run)."""
    release_doc = yaml.safe_load((REPO_ROOT / "examples" / "flux" / "helmrelease.yaml").read_text())
    values = tmp_path / "values.yaml"
    # The ServiceMonitor CRD is not installed here: render the rest against the real API server.
    release_doc["spec"]["values"]["metrics"]["serviceMonitor"]["enabled"] = False
    release_doc["spec"]["values"]["peering"] = {"enabled": True, "name": "flux-example"}
    values.write_text(yaml.safe_dump(release_doc["spec"]["values"]))
    proc = cluster_helm.run(
        "install",
        "flux-example",
        str(CHART_DIR),
        "--namespace",
        namespace,
        "-f",
        str(values),
        "--dry-run=server",
    )
    assert "registry.example.com/kubetune/operator:0.1.0" in proc.stdout
