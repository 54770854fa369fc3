"""examples/argocd and examples/flux point at real paths and carry values the chart accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT, Helm, container_env, one

EXAMPLES = REPO_ROOT / "examples"


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def test_argocd_application_renders_the_chart(helm: Helm, tmp_path: Path) -> None:
    app = load(EXAMPLES / "argocd" / "kubetune-application.yaml")
    assert app["kind"] == "Application"
    source = app["spec"]["source"]
    assert (REPO_ROOT / source["path"] / "Chart.yaml").exists()
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    objects = helm.template("-f", str(values), release=source["helm"]["releaseName"])
    env = container_env(one(objects, "Deployment"))
    assert env["KUBETUNE_NAMESPACES"] == "ml-team"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com/kubetune/trainer:0.1.0"


def test_finetunejobs_application_syncs_the_example_folder() -> None:
    app = load(EXAMPLES / "argocd" / "finetunejobs-application.yaml")
    folder = REPO_ROOT / app["spec"]["source"]["path"]
    manifests = sorted(folder.glob("*.yaml"))
    assert manifests
    for manifest in manifests:
        doc = load(manifest)
        assert doc["kind"] == "FineTuneJob"
        assert doc["metadata"]["namespace"] == app["spec"]["destination"]["namespace"]


def test_flux_helmrelease_renders_the_chart(helm: Helm, tmp_path: Path) -> None:
    release = load(EXAMPLES / "flux" / "helmrelease.yaml")
    source = load(EXAMPLES / "flux" / "gitrepository.yaml")
    chart = release["spec"]["chart"]["spec"]
    assert chart["sourceRef"]["kind"] == source["kind"]
    assert chart["sourceRef"]["name"] == source["metadata"]["name"]
    assert (REPO_ROOT / chart["chart"] / "Chart.yaml").exists()
    assert release["spec"]["upgrade"]["crds"] == "CreateReplace"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(release["spec"]["values"]))
    objects = helm.template("-f", str(values), release=release["spec"]["releaseName"])
    assert one(objects, "ServiceMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(objects, "ClusterKopfPeering")


def test_flux_kustomization_points_at_the_finetunejobs() -> None:
    kustomization = load(EXAMPLES / "flux" / "finetunejobs-kustomization.yaml")
    folder = REPO_ROOT / kustomization["spec"]["path"]
    assert any(load(p)["kind"] == "FineTuneJob" for p in folder.glob("*.yaml"))


GITOPS_FILES = sorted(
    p.relative_to(REPO_ROOT).as_posix()
    for folder in ("argocd", "flux")
    for p in (EXAMPLES / folder).rglob("*.yaml")
)


def test_gitops_examples_exist() -> None:
    assert len(GITOPS_FILES) >= 7, GITOPS_FILES


@pytest.mark.parametrize("path", GITOPS_FILES)
def test_example_is_one_yaml_object(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((REPO_ROOT / path).read_text()) if d]
    assert len(docs) == 1
    assert "kind" in docs[0] or set(docs[0]) == {"data"}  # the argocd-cm patch is a bare data stanza
