"""End to end with the real images: the chart installs the operator image, and a FineTuneJob
trains in the trainer image under the restricted profile.

A control plane of its own, one node agent in OCI mode (crun, the images ``make images`` built,
the pods' securityContext enforced), ``helm install`` of charts/kubetune with the built tags, so
the operator runs as the chart's pod from its image, in a namespace that enforces the
``restricted`` Pod Security Standard. The tiny QLoRA job of the other end-to-end tests then runs
from the trainer image as the operator's pod builder makes it: UID 65532, read-only root
filesystem, every capability dropped, seccomp RuntimeDefault. After it succeeds, the container's
own upper layer of the image holds nothing (only the mount points the runtime made), so every
cache and scratch file went to the pod's volumes, and the trainer's log has no write refused.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_localenv import stack
from kubetune_localenv.agents import agent_state_dir, start_agent
from kubetune_localenv.cluster import LocalEnv
from kubetune_nodeagent.imagestore import ImageStore

from .conftest import OPERATOR_IMAGE, TRAINER_IMAGE, image_store_dir, stale_api, unavailable

pytestmark = [pytest.mark.images, pytest.mark.cluster, pytest.mark.timeout(1500)]

JSON = dict[str, Any]
NODE = "kubetune-oci"
OPERATOR_NAMESPACE = "kubetune-system"
TRAIN_TIMEOUT = 900.0
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What libraries print when a cache or config directory is not writable.
REFUSED_WRITES = (
    "Read-only file system",
    "Permission denied",
    "is not writable",
    "created a temporary cache directory",  # matplotlib
    "problem when trying to write in your cache folder",  # huggingface_hub
)


def restricted_namespace(env: LocalEnv, name: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}
    env.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def install_chart(env: LocalEnv) -> None:
    """``helm install`` with the built images' tags, into a restricted namespace."""
    operator_repo, operator_tag = OPERATOR_IMAGE.rsplit(":", 1)
    trainer_repo, trainer_tag = TRAINER_IMAGE.rsplit(":", 1)
    images = {
        "image": {"repository": operator_repo, "tag": operator_tag},
        "trainer": {"image": {"repository": trainer_repo, "tag": trainer_tag}},
    }
    restricted_namespace(env, OPERATOR_NAMESPACE)
    stack.install_with_helm(env, OPERATOR_NAMESPACE, values=images)


@pytest.fixture(scope="module")
def chart_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    stale = stale_api()
    if stale is not None:
        unavailable(stale)
    env = LocalEnv(tmp_path_factory.mktemp("images-e2e"))
    oci = ["--runtime=oci", f"--image-store={image_store_dir()}", "--restart-backoff=2"]
    env.extra_start.append(lambda e: start_agent(e, node_name=NODE, gpus=0, extra_args=oci))
    env.start()
    try:
        install_chart(env)
        yield env
    finally:
        env.stop()


def pods(env: LocalEnv, namespace: str, selector: str) -> list[JSON]:
    items: list[JSON] = json.loads(env.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))[
        "items"
    ]
    return items


def image_id(reference: str) -> str:
    stored = ImageStore(image_store_dir() / "root").lookup(reference)
    assert stored is not None, reference
    return f"sha256:{stored.id}"


def written_in_the_image(pod_dir: Path, container: str) -> list[str]:
    """Files the container left in its own upper layer of the image: anything but the empty
    directories and empty files the runtime creates as mount points."""
    upper = pod_dir / "run" / f"{container}.oci" / "upper"
    assert upper.is_dir(), upper
    return sorted(
        str(p.relative_to(upper))
        for p in upper.rglob("*")
        if p.is_symlink() or (p.is_file() and p.stat().st_size > 0)
    )


def test_the_operator_runs_from_its_image_as_the_charts_pod(chart_env: LocalEnv) -> None:
    (pod,) = pods(chart_env, OPERATOR_NAMESPACE, "app.kubernetes.io/instance=kubetune")
    assert pod["spec"]["nodeName"] == NODE
    (status,) = pod["status"]["containerStatuses"]
    assert "running" in status["state"], status
    assert (status["image"], status["imageID"]) == (OPERATOR_IMAGE, image_id(OPERATOR_IMAGE))
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def ended(env: LocalEnv, namespace: str, name: str) -> JSON | None:
    """The FineTuneJob once it has ended, or once the operator refuses its spec (it retries
    that forever, waiting for a fix: nothing would happen until the timeout)."""
    ftj = stack.get_ftj(env, namespace, name)
    status = ftj.get("status") or {}
    return (
        ftj
        if status.get("phase") in ("Succeeded", "Failed") or status.get("reason") == "InvalidSpec"
        else None
    )


def _trainer_log(env: LocalEnv, namespace: str, pod: JSON) -> str:
    path = agent_state_dir(env, NODE) / "pods" / f"{namespace}_{pod['metadata']['name']}" / "trainer.log"
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def test_a_finetunejob_trains_in_the_trainer_image_under_the_restricted_profile(
    chart_env: LocalEnv, tmp_path: Path
) -> None:
    started = time.monotonic()
    namespace = "images-" + secrets.token_hex(3)
    restricted_namespace(chart_env, namespace)
    stack.create_credentials_secret(chart_env, namespace)
    bucket = "images-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(chart_env, bucket, tmp_path)
    job = stack.render_tiny_job(chart_env, name="tiny-image", namespace=namespace, bucket=bucket)
    (tmp_path / "job.yaml").write_text(job.manifest)
    chart_env.kubectl("apply", "-f", str(tmp_path / "job.yaml"))

    done = stack.wait_for(
        "the FineTuneJob to finish", lambda: ended(chart_env, namespace, job.name), TRAIN_TIMEOUT, interval=2
    )
    found = pods(chart_env, namespace, f"kubetune.dev/finetunejob={job.name}")
    log = _trainer_log(chart_env, namespace, found[0]) if found else "(no trainer pod)"
    assert done["status"]["phase"] == "Succeeded", (json.dumps(done["status"], indent=2), log[-4000:])
    (pod,) = found
    print(f"images e2e: applied to Succeeded in {time.monotonic() - started:.0f} s")

    (status,) = pod["status"]["containerStatuses"]
    assert (status["image"], status["imageID"]) == (TRAINER_IMAGE, image_id(TRAINER_IMAGE))
    spec = pod["spec"]
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = spec["containers"][0]["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}

    outputs = stack.folder_objects(stack.s3_client(chart_env), bucket, job.output_prefix)
    for required in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "metrics.json"):
        assert required in outputs, sorted(outputs)

    pod_dir = agent_state_dir(chart_env, NODE) / "pods" / f"{namespace}_{pod['metadata']['name']}"
    assert written_in_the_image(pod_dir, "trainer") == []
    refused = [line for line in log.splitlines() if any(words in line for words in REFUSED_WRITES)]
    assert not refused, refused
    # HOME and TMPDIR are the scratch volume; the image's ENV puts every library cache under
    # its .cache (a ~/.config/matplotlib or ~/.triton here would mean a default slipped through).
    scratch = pod_dir / "volumes" / "scratch"
    listed = sorted(str(p.relative_to(scratch)) for p in scratch.glob("*/*"))
    print(f"images e2e: the scratch volume holds {listed}")
    assert {p.name for p in scratch.iterdir()} <= {".cache", "kubetune"}, listed
