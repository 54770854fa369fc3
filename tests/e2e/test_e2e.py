"""End to end: kubectl apply → operator → Job → node agent → trainer → S3 → status.

Everything is real: kube-apiserver, kube-controller-manager, the node agent
running the trainer pod as a local process, the operator as its own process
(``python -m kubetune_operator``), versitygw for S3, and QLoRA on a tiny Llama.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_localenv import stack, tinymodel
from kubetune_localenv.agents import start_agent
from kubetune_localenv.cluster import LocalEnv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAIN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """A control plane of its own with a node agent and the operator running."""
    env = LocalEnv(tmp_path_factory.mktemp("e2e"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    try:
        stack.install_crd(env)
        stack.start_operator(env)
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="module")
def e2e_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-work")


@pytest.fixture
def job_ns(e2e_env: LocalEnv) -> str:
    namespace = "e2e-" + secrets.token_hex(3)
    stack.ensure_namespace(e2e_env, namespace)
    stack.create_credentials_secret(e2e_env, namespace)
    return namespace


def _apply(env: LocalEnv, job: stack.TinyJob, tmp_path: Path) -> None:
    manifest = tmp_path / f"{job.name}.yaml"
    manifest.write_text(job.manifest)
    env.kubectl("apply", "-f", str(manifest))


def _pods(env: LocalEnv, namespace: str, name: str) -> list[dict[str, Any]]:
    out = env.kubectl("get", "pods", "-n", namespace, "-l", f"kubetune.dev/finetunejob={name}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _read_json(client: Any, bucket: str, key: str) -> Any:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _set_suspend(env: LocalEnv, job: stack.TinyJob, suspend: bool) -> None:
    patch = json.dumps({"spec": {"suspend": suspend}})
    env.kubectl("patch", "ftj", job.name, "-n", job.namespace, "--type=merge", "-p", patch)


def test_apply_trains_and_writes_the_adapter_then_delete_cleans_up(
    e2e_env: LocalEnv, e2e_work: Path, job_ns: str, tmp_path: Path
) -> None:
    bucket = "e2e-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(e2e_env, bucket, e2e_work)
    job = stack.render_tiny_job(e2e_env, name="tiny-chat", namespace=job_ns, bucket=bucket)
    _apply(e2e_env, job, tmp_path)

    # Progress shows in `kubectl get ftj` while the trainer runs.
    seen_progress: list[str] = []

    def progress_visible() -> bool:
        line = e2e_env.kubectl("get", "ftj", job.name, "-n", job_ns, "--no-headers")
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "Running" and "/" in fields[2]:
            seen_progress.append(line.strip())
        return bool(seen_progress) or fields[1] in {"Succeeded", "Failed"}

    stack.wait_for("training progress in kubectl get ftj", progress_visible, TRAIN_TIMEOUT)
    done = stack.wait_for(
        "the FineTuneJob to finish",
        lambda: stack.phase_in(e2e_env, job_ns, job.name, {"Succeeded", "Failed"}),
        TRAIN_TIMEOUT,
    )
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert seen_progress, "no Running row with step progress was ever seen"
    assert status["outputURI"] == f"s3://{bucket}/{job.output_prefix}"
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 24
    assert isinstance(status["progress"]["loss"], float)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"

    client = stack.s3_client(e2e_env)
    outputs = stack.folder_objects(client, bucket, job.output_prefix)
    for required in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "metrics.json"):
        assert required in outputs, sorted(outputs)
    manifest = _read_json(client, bucket, f"{job.output_prefix}/manifest.json")
    listed = {f["path"] for f in manifest["files"]}
    assert "adapter_model.safetensors" in listed

    # Delete: every child goes (owner references + GC), the outputs stay.
    e2e_env.kubectl("delete", "ftj", job.name, "-n", job_ns, "--wait=true", "--timeout=60s")

    def children_gone() -> bool:
        kinds = "jobs,pods,configmaps,serviceaccounts,roles,rolebindings"
        out = e2e_env.kubectl(
            "get", kinds, "-n", job_ns, "-l", f"kubetune.dev/finetunejob={job.name}", "-o", "name"
        )
        return not out.strip()

    stack.wait_for("the FineTuneJob's children to be garbage-collected", children_gone, 90)
    assert "adapter_model.safetensors" in stack.folder_objects(client, bucket, job.output_prefix)


def test_bad_dataset_fails_with_the_line_and_is_not_retried(
    e2e_env: LocalEnv, e2e_work: Path, job_ns: str, tmp_path: Path
) -> None:
    bucket = "e2e-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(e2e_env, bucket, e2e_work)
    client = stack.s3_client(e2e_env)
    good = tinymodel.to_jsonl(tinymodel.chat_records(4)).decode().splitlines()
    broken = [*good[:2], '{"messages": [{"role": "user"}]}', *good[2:]]
    client.put_object(Bucket=bucket, Key="datasets/colors/train.jsonl", Body="\n".join(broken).encode())
    job = stack.render_tiny_job(e2e_env, name="bad-data", namespace=job_ns, bucket=bucket)
    _apply(e2e_env, job, tmp_path)

    done = stack.wait_for(
        "the FineTuneJob to fail",
        lambda: stack.phase_in(e2e_env, job_ns, job.name, {"Succeeded", "Failed"}),
        TRAIN_TIMEOUT,
    )
    status = done["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=2)
    assert status["reason"] == "InvalidDataset"
    assert "train.jsonl line 3" in status["message"]
    assert "content" in status["message"]
    time.sleep(3)  # a retry, if one were (wrongly) made, would show up as a second pod
    assert len(_pods(e2e_env, job_ns, job.name)) == 1
    assert "manifest.json" not in stack.folder_objects(client, bucket, job.output_prefix)


def test_a_missing_credentials_secret_is_named_and_creating_it_lets_the_retry_train(
    e2e_env: LocalEnv, e2e_work: Path, tmp_path: Path
) -> None:
    """The Secret volume is optional: the pod starts (no ContainerCreating holding the node), the
    trainer finds it empty and exits 47 SecretMissing before touching S3; the Job retries, and
    once the user creates the Secret the next attempt trains."""
    namespace = "e2e-" + secrets.token_hex(3)
    stack.ensure_namespace(e2e_env, namespace)  # no credentials Secret in it yet
    bucket = "e2e-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(e2e_env, bucket, e2e_work)
    job = stack.render_tiny_job(e2e_env, name="no-secret", namespace=namespace, bucket=bucket)
    _apply(e2e_env, job, tmp_path)

    def first_attempt_failed() -> dict[str, Any] | None:
        status = stack.get_ftj(e2e_env, namespace, job.name).get("status") or {}
        return status if "SecretMissing" in str(status.get("message")) else None

    status = stack.wait_for(
        "the first attempt to fail with SecretMissing", first_attempt_failed, TRAIN_TIMEOUT
    )
    assert status["phase"] in {"Pending", "Running"}, json.dumps(status, indent=2)  # retried, not failed
    assert "storage.credentialsSecretRef: the Secret, or its key" in status["message"]
    stack.create_credentials_secret(e2e_env, namespace)

    done = stack.wait_for(
        "the retry to train",
        lambda: stack.phase_in(e2e_env, namespace, job.name, {"Succeeded", "Failed"}),
        TRAIN_TIMEOUT,
    )
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=2)
    assert len(_pods(e2e_env, namespace, job.name)) == 2


def test_suspend_keeps_the_checkpoint_and_resume_continues_from_it(
    e2e_env: LocalEnv, e2e_work: Path, job_ns: str, tmp_path: Path
) -> None:
    bucket = "e2e-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(e2e_env, bucket, e2e_work)
    job = stack.render_tiny_job(
        e2e_env, name="pausable", namespace=job_ns, bucket=bucket, max_steps=120, save_steps=4
    )
    _apply(e2e_env, job, tmp_path)
    client = stack.s3_client(e2e_env)

    def checkpoint_step() -> int | None:
        progress = stack.get_ftj(e2e_env, job_ns, job.name).get("status", {}).get("progress", {})
        last = progress.get("lastCheckpoint")
        return int(str(last).rstrip("/").rsplit("-", 1)[-1]) if last else None

    saved = stack.wait_for("a complete checkpoint", checkpoint_step, TRAIN_TIMEOUT, interval=0.5)
    _set_suspend(e2e_env, job, True)
    stack.wait_for("phase Suspended", lambda: stack.phase_in(e2e_env, job_ns, job.name, {"Suspended"}), 120)
    stack.wait_for("the trainer pod to go", lambda: not _pods(e2e_env, job_ns, job.name), 120)
    kept = stack.folder_objects(client, bucket, f"{job.output_prefix}/checkpoints")
    # The trainer may save again on SIGTERM and saveTotalLimit prunes older ones: what must
    # survive suspension is a complete checkpoint at least as new as the one seen.
    complete = [int(key.split("/")[0].split("-")[1]) for key in kept if key.endswith("/_COMPLETE")]
    assert complete, sorted(kept)
    assert max(complete) >= saved, sorted(kept)

    _set_suspend(e2e_env, job, False)
    done = stack.wait_for(
        "the resumed FineTuneJob to finish",
        lambda: stack.phase_in(e2e_env, job_ns, job.name, {"Succeeded", "Failed"}),
        TRAIN_TIMEOUT * 2,
    )
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"], indent=2)
    metrics = _read_json(client, bucket, f"{job.output_prefix}/metrics.json")
    assert metrics["resumedFromStep"] == max(complete)
