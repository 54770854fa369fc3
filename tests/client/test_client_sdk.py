"""The SDK and the CLI on one real run: submit with the typed spec, watch it to Succeeded with
``kubetune status --watch``, then list, metrics, checkpoints and download (checksums verified,
a tampered object refused), all against the real control plane, operator, node agent, trainer
(QLoRA on a tiny Llama, CPU) and S3 server. One training run for the whole module."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kubetune_api.reasons import Phase
from kubetune_api.spec import FineTuneJobSpec
from kubetune_client import Client, Exit, Job, NotFoundError
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv

from .conftest import Cli, fails_with, new_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAIN_TIMEOUT = 600


@pytest.fixture(scope="module")
def tiny(client_env: LocalEnv, client_work: Path) -> stack.TinyJob:
    """The tiny model and chat data in a fresh bucket, and the example manifest for them."""
    namespace = new_namespace(client_env)
    bucket = "cli-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(client_env, bucket, client_work)
    return stack.render_tiny_job(client_env, name="tiny-chat", namespace=namespace, bucket=bucket)


@pytest.fixture(scope="module")
def submitted(client_env: LocalEnv, tiny: stack.TinyJob) -> Job:
    """The run, submitted through the SDK with the API's typed spec (not waited for)."""
    spec = FineTuneJobSpec.model_validate(yaml.safe_load(tiny.manifest)["spec"])
    client = Client(kubeconfig=client_env.kubeconfig, namespace=tiny.namespace)
    return client.submit(spec, name=tiny.name)


@pytest.fixture
def job(submitted: Job, aws_credentials: None) -> Job:
    """The run, finished (the first test watches it; the others find it done)."""
    return submitted.wait(timeout=TRAIN_TIMEOUT)


def test_submit_applies_the_crd_defaults_and_watch_follows_the_run_to_succeeded(
    cli: Cli, submitted: Job
) -> None:
    assert submitted.resource.spec.training.max_steps == 24
    assert submitted.resource.spec.lora.r == 8
    assert submitted.resource.spec.training.lr_scheduler_type == "linear"  # a default, sent explicitly
    result = cli(
        "status", submitted.name, "-n", submitted.namespace, "--watch", "--timeout", str(TRAIN_TIMEOUT)
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    phases = [line for line in lines if line.startswith(f"{submitted.name}: ")]
    assert any(line.startswith(f"{submitted.name}: Running") for line in phases), result.stdout
    assert phases[-1] == f"{submitted.name}: Succeeded (Completed)", result.stdout
    assert "24/24" in result.stdout  # the bar's last state: step/total


def test_wait_returns_the_succeeded_job_and_metrics_come_from_the_output(job: Job) -> None:
    assert job.phase is Phase.SUCCEEDED
    assert job.progress.step == job.progress.total_steps == 24
    metrics = job.metrics()
    assert metrics["globalStep"] == 24
    assert isinstance(metrics["trainLoss"], float)
    assert [entry["step"] for entry in metrics["lossHistory"]][-1] == 24


def test_list_shows_the_job_with_its_phase_and_progress(cli: Cli, job: Job) -> None:
    result = cli("list", "-n", job.namespace)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith(job.name))
    assert row.split()[:3] == [job.name, "Succeeded", "24/24"]
    items = cli.json("list", "-n", job.namespace)["items"]
    assert [i["metadata"]["name"] for i in items] == [job.name]
    assert items[0]["status"]["phase"] == "Succeeded"


def test_checkpoints_lists_the_complete_ones_with_their_metrics(
    cli: Cli, job: Job, tiny: stack.TinyJob, client_env: LocalEnv
) -> None:
    s3 = stack.s3_client(client_env)
    prefix = f"{tiny.output_prefix}/checkpoints"
    # An incomplete checkpoint (no _COMPLETE marker, as a pod killed mid-upload leaves) must not count.
    s3.put_object(Bucket=tiny.bucket, Key=f"{prefix}/step-999/adapter_model.safetensors", Body=b"partial")
    try:
        objects = stack.folder_objects(s3, tiny.bucket, prefix)
        marked = sorted(
            int(key.split("/")[0].removeprefix("step-")) for key in objects if key.endswith("/_COMPLETE")
        )
        assert marked, sorted(objects)
        found = job.checkpoints()
        assert [c.step for c in found] == marked
        for ckpt in found:
            assert ckpt.uri == f"s3://{tiny.bucket}/{prefix}/step-{ckpt.step}"
            assert isinstance(ckpt.loss, float)
            assert isinstance(ckpt.eval_loss, float)  # evalSteps == saveSteps in the tiny job
            assert ckpt.saved_at is not None
        listed = cli.json("checkpoints", job.name, "-n", job.namespace)
        assert [c["step"] for c in listed] == marked
        assert listed[-1]["evalLoss"] == found[-1].eval_loss
    finally:
        s3.delete_object(Bucket=tiny.bucket, Key=f"{prefix}/step-999/adapter_model.safetensors")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_every_file_and_the_adapter_loads(
    cli: Cli, job: Job, tmp_path: Path, client_work: Path
) -> None:
    dest = tmp_path / "adapter"
    result = cli("download", job.name, str(dest), "-n", job.namespace)
    assert result.exit_code == 0, result.output
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"adapter_model.safetensors", "adapter_config.json"}
    for entry in manifest["files"]:
        assert _sha256(dest / entry["path"]) == entry["sha256"], entry["path"]
    assert not list(dest.rglob("*.part"))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(client_work / "tiny-llama"))
    model = PeftModel.from_pretrained(base, str(dest))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_download_refuses_an_object_changed_after_publishing(
    cli: Cli, job: Job, tiny: stack.TinyJob, client_env: LocalEnv, tmp_path: Path
) -> None:
    s3 = stack.s3_client(client_env)
    key = f"{tiny.output_prefix}/adapter_config.json"
    original = stack.object_bytes(s3, tiny.bucket, key)
    tampered = original.replace(b'"r": 8', b'"r": 9')
    assert tampered != original
    assert len(tampered) == len(original)  # same size: only the sha256 can tell
    s3.put_object(Bucket=tiny.bucket, Key=key, Body=tampered)
    try:
        dest = tmp_path / "tampered"
        result = cli("download", job.name, str(dest), "-n", job.namespace)
        fails_with(result, Exit.CHECKSUM_MISMATCH, "adapter_config.json", "sha256")
        assert not (dest / "adapter_config.json").exists()
        assert not (dest / "adapter_config.json.part").exists()
    finally:
        s3.put_object(Bucket=tiny.bucket, Key=key, Body=original)


def test_a_suspended_job_resumes_and_suspends_and_has_no_result_to_download(
    cli: Cli, job: Job, client_env: LocalEnv, tmp_path: Path, aws_credentials: None
) -> None:
    """After the main run (so the two do not share the CPU): kubetune run -f --suspend, resume, suspend."""
    namespace = new_namespace(client_env)
    other = stack.render_tiny_job(client_env, name="later", namespace=namespace, bucket=bucket_of(job))
    manifest = tmp_path / "later.yaml"
    manifest.write_text(other.manifest)
    created = cli("run", "-f", str(manifest), "--suspend")
    assert created.exit_code == 0, created.output
    assert "finetunejob.kubetune.dev/later created in namespace" in created.stdout

    client = Client(kubeconfig=client_env.kubeconfig, namespace=namespace)
    later = client.get("later")
    assert later.resource.spec.suspend is True
    _until_phase(later, Phase.SUSPENDED)

    fails_with(
        cli("download", "later", str(tmp_path / "none"), "-n", namespace), Exit.NOT_READY, "manifest.json"
    )

    assert cli("resume", "later", "-n", namespace).exit_code == 0
    assert later.refresh().resource.spec.suspend is False
    _until(later, lambda j: j.phase is not Phase.SUSPENDED)
    assert cli("suspend", "later", "-n", namespace).exit_code == 0
    assert later.refresh().resource.spec.suspend is True
    _until_phase(later, Phase.SUSPENDED)
    client_env.kubectl("delete", "ftj", "later", "-n", namespace, "--wait=false")


def bucket_of(job: Job) -> str:
    return job.output_uri.removeprefix("s3://").split("/", 1)[0]


def _until(job: Job, done: Callable[[Job], bool], timeout: float = 120) -> Job:
    for current in job.updates(timeout):
        if done(current):
            return current
    raise AssertionError(f"{job.name} never got there; last phase {job.phase} ({job.status.reason})")


def _until_phase(job: Job, phase: Phase) -> Job:
    return _until(job, lambda j: j.phase is phase)


def test_run_from_flags_is_checked_by_the_models_and_the_api_server(cli: Cli, job: Job) -> None:
    flags = ["--model", "s3://models/tiny", "--dataset", "s3://data/train.jsonl", "--gpus", "0"]
    ok = cli(
        "run", "--name", "from-flags", *flags, "--output", "s3://out/x", "--dry-run", "-n", job.namespace
    )
    assert ok.exit_code == 0, ok.output
    assert "dry run, nothing created" in ok.stdout
    with pytest.raises(NotFoundError):
        Client(namespace=job.namespace, kubeconfig=cli.env["KUBECONFIG"]).get("from-flags")

    bad = cli("run", "--name", "from-flags", *flags, "--output", "http://out/x", "-n", job.namespace)
    fails_with(bad, Exit.INVALID_SPEC, "spec.output.uri", "s3://")
    clash = cli("run", "--name", job.name, *flags, "--output", "s3://out/x", "-n", job.namespace)
    fails_with(clash, Exit.ALREADY_EXISTS, job.name)


def test_status_prints_the_progress_and_json(cli: Cli, job: Job) -> None:
    result = cli("status", job.name, "-n", job.namespace)
    assert result.exit_code == 0, result.output
    assert "Succeeded" in result.stdout
    assert "24/24" in result.stdout
    assert f"s3://{bucket_of(job)}/adapters/{job.name}" in result.stdout
    assert cli.json("status", job.name, "-n", job.namespace)["status"]["progress"]["step"] == 24


def test_status_plot_draws_the_published_loss_curve(cli: Cli, job: Job) -> None:
    history = job.loss_history()
    assert history.source.endswith("/metrics.json")
    steps = [step for step, _ in history.train]
    assert steps == sorted(steps)
    assert len(steps) >= 2
    assert steps[-1] <= 24
    result = cli("status", job.name, "-n", job.namespace, "--plot")
    assert result.exit_code == 0, result.output
    assert "* train loss" in result.stdout
    assert history.source in result.stdout.replace("\n", "")


def test_logs_finds_the_trainer_pod_and_says_when_its_node_serves_no_log(
    cli: Cli, job: Job, client_env: LocalEnv
) -> None:
    """The node agent plays kubelet but serves no /containerLogs (docs/nodeagent.md): the API server's
    answer reaches the user as exit 14 naming the pod, not a traceback. Reading a log for real needs
    a node that serves it."""
    label = f"kubetune.dev/finetunejob={job.name}"
    pods = json.loads(client_env.kubectl("get", "pods", "-n", job.namespace, "-l", label, "-o", "json"))
    names = [p["metadata"]["name"] for p in pods["items"]]
    assert len(names) == 1, names
    result = cli("logs", job.name, "-n", job.namespace)
    fails_with(result, Exit.LOGS_UNAVAILABLE, f"the log of pod {names[0]}", "containerLogs")
