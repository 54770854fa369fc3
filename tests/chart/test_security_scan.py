"""Security/best-practice scan of the rendered chart with kube-score (built from the Go module proxy).

Every kube-score check runs, optional ones included, except those listed with a reason in
hack/tools/kube-score/ignored-tests.yaml. Any CRITICAL finding fails; the default render must
also be free of WARNINGs. (kube-linter, which the issue also allows, is not served by the Go
module proxy here; checkov is not among the project's dependencies.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT, Helm

IGNORED = yaml.safe_load((REPO_ROOT / "hack" / "tools" / "kube-score" / "ignored-tests.yaml").read_text())[
    "ignored"
]

RENDERS = {
    "default": [],
    "namespace-scoped": [
        "--set",
        "watchNamespaces={ml,research}",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ],
    "single-replica": ["--set", "replicaCount=1", "--set", "image.digest=sha256:" + "b" * 64],
}


def checks(kube_score: Path) -> dict[str, str]:
    """kube-score's checks: id -> "default" | "optional"."""
    proc = subprocess.run([str(kube_score), "list"], capture_output=True, text=True, check=True)
    out = {}
    for line in proc.stdout.splitlines():
        fields = line.split(",")
        if len(fields) >= 4 and fields[-1] in {"default", "optional"}:
            out[fields[0]] = fields[-1]
    return out


def scan(kube_score: Path, manifests: Path) -> list[dict[str, Any]]:
    """Run kube-score; return the findings (one per object and check) as JSON dicts."""
    known = checks(kube_score)
    assert set(IGNORED) <= set(known), f"unknown checks in ignored-tests.yaml: {set(IGNORED) - set(known)}"
    argv = [
        str(kube_score),
        "score",
        str(manifests),
        "--output-format",
        "json",
        "--kubernetes-version",
        "v1.30",
    ]
    for check, kind in sorted(known.items()):
        if check in IGNORED:
            if kind == "default":
                argv += ["--ignore-test", check]
        elif kind == "optional":
            argv += ["--enable-optional-test", check]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    # kube-score exits 1 when it found a CRITICAL; the findings are in the JSON either way.
    assert proc.returncode in (0, 1), proc.stderr
    findings: list[dict[str, Any]] = []
    for obj in json.loads(proc.stdout):
        for check in obj["checks"]:
            findings.append(
                {
                    "object": f"{obj['type_meta']['kind']}/{obj['object_name']}",
                    "check": check["check"]["id"],
                    "grade": check["grade"],
                    "skipped": check["skipped"],
                    "comments": [c.get("summary", "") for c in check.get("comments") or []],
                }
            )
    return findings


CRITICAL, WARNING = 1, 5  # kube-score's grades (0 = all OK is 10)


@pytest.mark.parametrize("render", sorted(RENDERS))
def test_no_critical_findings(helm: Helm, kube_score: Path, tmp_path: Path, render: str) -> None:
    objects = helm.template(*RENDERS[render])
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all(objects))
    findings = scan(kube_score, manifests)
    assert any(f["object"].startswith("Deployment/") for f in findings), "kube-score saw no Deployment"
    critical = [f for f in findings if not f["skipped"] and f["grade"] == CRITICAL]
    assert not critical, critical
    if render == "default":
        warnings = [f for f in findings if not f["skipped"] and f["grade"] == WARNING]
        assert not warnings, warnings


def test_scan_catches_an_insecure_deployment(helm: Helm, kube_score: Path, tmp_path: Path) -> None:
    """The scan is live: a privileged, root, limitless container is reported CRITICAL."""
    objects = helm.template()
    deploy = next(o for o in objects if o["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True, "runAsUser": 0}
    del container["resources"]
    manifests = tmp_path / "insecure.yaml"
    manifests.write_text(yaml.safe_dump_all([deploy]))
    critical = {
        f["check"] for f in scan(kube_score, manifests) if not f["skipped"] and f["grade"] == CRITICAL
    }
    assert {"container-security-context-privileged", "container-resources"} <= critical, critical


def test_a_finetunejobs_children_pass_the_scan(kube_score: Path, tmp_path: Path) -> None:
    """What the operator creates for a job (with the trainer NetworkPolicy on) scans clean too."""
    from kubetune_operator import builders

    spec = {
        "model": {"source": "s3://models/llama"},
        "dataset": {"train": "s3://data/t.jsonl"},
        "output": {"uri": "s3://out/run"},
        "storage": {"credentialsSecretRef": {"name": "s3-creds"}},
        "resources": {"gpus": 1, "cpu": 8, "memory": "64Gi", "scratch": "200Gi"},
    }
    ftj = {"metadata": {"name": "run", "namespace": "ml", "uid": "u1"}, "spec": spec}
    egress: dict[str, list[dict[str, Any]]] = {
        "dns": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
        "objectStore": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
    }
    manifests = tmp_path / "children.yaml"
    manifests.write_text(
        yaml.safe_dump_all(builders.children(ftj, "registry.example/trainer@sha256:" + "c" * 64, egress))
    )
    findings = scan(kube_score, manifests)
    job = [f for f in findings if f["object"].startswith("Job/") and f["object"].endswith("/run-trainer")]
    assert job, "kube-score saw no Job"
    policy = [f for f in job if f["check"] == "pod-networkpolicy"]
    assert policy, "kube-score did not check the trainer's NetworkPolicy"
    assert policy[0]["grade"] != CRITICAL, policy
    critical = [f for f in findings if not f["skipped"] and f["grade"] == CRITICAL]
    assert not critical, critical
