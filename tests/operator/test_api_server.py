"""The CRD on the real kube-apiserver: validation, printer columns, explain, and RBAC of the trainer."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
INVALID = sorted((HERE / "invalid").glob("*.yaml"))
EXAMPLE = HERE.parents[1] / "examples" / "finetunejob.yaml"


def _expected_field(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.removeprefix("# expect:").strip()
    raise AssertionError(f"{path.name} has no '# expect: <field>' line")


def expected_message(path: Path) -> str | None:
    """The words the error must contain, where the message itself is under test (``# message:``)."""
    for line in path.read_text().splitlines():
        if line.startswith("# message:"):
            return line.removeprefix("# message:").strip()
    return None


def test_there_are_enough_invalid_manifests() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("manifest", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(
    local_env: Any, crd_installed: Any, namespace: str, manifest: Path
) -> None:
    field = _expected_field(manifest)
    documents = list(yaml.safe_load_all(manifest.read_text()))
    *setup, rejected = documents
    for doc in setup:  # update cases: create the original first
        local_env.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    result = subprocess.run(
        [*_kubectl(local_env), "apply", "-n", namespace, "-f", "-"],
        input=yaml.safe_dump(rejected),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, f"{manifest.name} was accepted:\n{result.stdout}"
    assert field in result.stderr, f"{manifest.name}: {field!r} not named in:\n{result.stderr}"
    words = expected_message(manifest)
    assert words is None or words in result.stderr, f"{manifest.name}: {words!r} not in:\n{result.stderr}"


def _kubectl(local_env: Any) -> list[str]:
    from kubetune_localenv import tools

    return [str(tools.tool_path("kubectl")), f"--kubeconfig={local_env.kubeconfig}"]


def test_example_is_valid_and_editable_where_documented(
    local_env: Any, crd_installed: Any, namespace: str
) -> None:
    local_env.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    # suspend and lifecycle stay editable after creation.
    local_env.kubectl(
        "patch", "ftj", name, "-n", namespace, "--type=merge",
        "-p", '{"spec": {"suspend": true, "lifecycle": {"backoffLimit": 5, "activeDeadlineSeconds": 100}}}',
    )  # fmt: skip
    spec = yaml.safe_load(local_env.kubectl("get", "ftj", name, "-n", namespace, "-o", "yaml"))["spec"]
    assert spec["suspend"] is True
    assert spec["lifecycle"]["backoffLimit"] == 5
    # Defaults are in the stored object (so GitOps tools see no drift).
    assert spec["dataset"]["fieldMapping"]["messages"] == "messages"
    assert spec["model"]["tokenSecretRef"]["key"] == "token"


def test_kubectl_get_shows_the_columns(local_env: Any, crd_installed: Any, kube: Any, namespace: str) -> None:
    from kubetune_operator.kube import FINETUNEJOBS

    local_env.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    progress = {
        "status": {"phase": "Running", "progressSummary": "120/900", "progress": {"step": 120, "loss": 1.25}}
    }
    kube.patch(FINETUNEJOBS, namespace, name, progress, "status")
    status = {"status": {"outputURI": "s3://ml-models/support/llama-3.2-3b-chat-qlora", "reason": "Training"}}
    kube.patch(FINETUNEJOBS, namespace, name, status, "status")

    lines = local_env.kubectl("get", "ftj", "-n", namespace).splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE"]
    assert lines[1].split()[:4] == [name, "Running", "120/900", "1.25"]

    wide = local_env.kubectl("get", "finetunejobs", "-n", namespace, "-o", "wide").splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "AGE", "REASON", "OUTPUT"]
    assert wide[1].split()[-2:] == ["Training", "s3://ml-models/support/llama-3.2-3b-chat-qlora"]


def test_kubectl_explain_teaches_the_api(local_env: Any, crd_installed: Any) -> None:
    spec = local_env.kubectl("explain", "finetunejob.spec")
    assert "The desired fine-tuning run" in spec
    for field in ("model", "dataset", "method", "quantization", "lora", "training", "output", "storage"):
        assert f"  {field}\t" in spec, field
    bits = " ".join(local_env.kubectl("explain", "ftj.spec.quantization.bits").split())
    assert "16 means no quantization. Unset: 4 for method qlora (which needs 4)" in bits
    assert "ENUM: 4 8 16" in bits
    progress = local_env.kubectl("explain", "finetunejob.status.progress")
    assert "patched by the trainer" in progress


def test_trainer_identity_reaches_only_its_own_finetunejob(
    local_env: Any, kube: Any, namespace: str, create_ftj: Any
) -> None:
    """The per-job Role, applied as the operator would: the token can patch its own status only."""
    from kubetune_operator import builders

    mine = create_ftj("mine")
    create_ftj("other")
    for obj in (builders.service_account(mine), builders.role(mine), builders.role_binding(mine)):
        kube.create(obj)

    who = f"--as=system:serviceaccount:{namespace}:mine-trainer"

    def can(*args: str) -> bool:
        out = local_env.kubectl("auth", "can-i", *args, "-n", namespace, who, check=False)
        return bool(out.strip() == "yes")

    assert can("patch", "finetunejobs.kubetune.dev/mine", "--subresource=status")
    assert can("get", "finetunejobs.kubetune.dev/mine")
    assert not can("patch", "finetunejobs.kubetune.dev/other", "--subresource=status")
    assert not can("patch", "finetunejobs.kubetune.dev/mine")  # the spec is not the trainer's
    assert not can("list", "finetunejobs.kubetune.dev")
    assert not can("get", "secrets")
    assert not can("delete", "finetunejobs.kubetune.dev/mine")
