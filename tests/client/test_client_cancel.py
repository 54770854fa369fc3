"""``kubetune cancel`` and ``Job.cancel()`` on a real run: the real control plane, operator, node
agent (which honours the pod's deletion: SIGTERM, grace period), trainer (QLoRA on a tiny Llama,
CPU) and S3 server. Cancelled mid-run, after a checkpoint: phase Cancelled, the Job and its pod
gone, the FineTuneJob and its status kept, every checkpoint kept in object storage."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from kubetune_api.reasons import Phase, Reason
from kubetune_client import Client, Exit, InvalidSpecError, JobCancelledError, KubetuneError
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv

from .conftest import Cli, fails_with, new_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


def test_cancel_mid_run_stops_the_trainer_and_keeps_status_and_checkpoints(
    cli: Cli, client_env: LocalEnv, client_work: Path, aws_credentials: None
) -> None:
    namespace = new_namespace(client_env, "cancel")
    bucket = "cancel-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(client_env, bucket, client_work)
    # Far more steps than it will run: it is cancelled once its first checkpoint is complete.
    tiny = stack.render_tiny_job(
        client_env, name="stopme", namespace=namespace, bucket=bucket, max_steps=2000, save_steps=4
    )
    manifest = client_work / f"stopme-{namespace}.yaml"
    manifest.write_text(tiny.manifest)
    assert cli("run", "-f", str(manifest)).exit_code == 0

    client = Client(kubeconfig=client_env.kubeconfig, namespace=namespace)
    job = client.get("stopme")
    for current in job.updates(timeout=600):
        if current.progress.last_checkpoint:
            break
    assert job.phase is Phase.RUNNING, (job.phase, job.status.reason, job.status.message)
    before = job.checkpoints()
    assert before, "no complete checkpoint before the cancel"

    result = cli("cancel", "stopme", "-n", namespace, "--wait", "--timeout", "420")
    assert result.exit_code == 0, result.output
    assert "stopme: cancel requested" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("stopme: Cancelled (Cancelled)"), result.stdout

    job.refresh()
    assert (job.phase, job.status.reason) == (Phase.CANCELLED, Reason.CANCELLED)
    assert job.status.completion_time is not None
    assert job.progress.step is not None
    assert job.progress.step < 2000
    label = "kubetune.dev/finetunejob=stopme"
    for kind in ("jobs", "pods"):
        items = json.loads(client_env.kubectl("get", kind, "-n", namespace, "-l", label, "-o", "json"))[
            "items"
        ]
        assert items == [], kind
    # Every checkpoint is kept, and the trainer saved where it stopped (SIGTERM) or later ones.
    after = job.checkpoints()
    assert {c.step for c in before} <= {c.step for c in after}
    assert max(c.step for c in after) >= max(c.step for c in before)

    # Cancelled is an end, not an error, unless asked.
    assert job.wait(timeout=5) is job
    with pytest.raises(JobCancelledError):
        job.wait(timeout=5, cancelled_ok=False)
    assert cli("status", "stopme", "-n", namespace, "--watch").exit_code == 0
    fails_with(
        cli("status", "stopme", "-n", namespace, "--watch", "--fail-on-cancel"),
        Exit.JOB_CANCELLED,
        "cancelled",
    )
    # Cancelling again changes nothing; resuming does nothing; un-cancelling is refused.
    assert cli("cancel", "stopme", "-n", namespace).exit_code == 0
    assert cli("resume", "stopme", "-n", namespace).exit_code == 0
    with pytest.raises((InvalidSpecError, KubetuneError)) as refused:
        job._kube.merge_patch(namespace, "stopme", {"spec": {"cancel": False}})
    assert "create a new FineTuneJob" in str(refused.value)
    assert job.refresh().phase is Phase.CANCELLED
    client_env.kubectl("delete", "ftj", "stopme", "-n", namespace, "--wait=false")


def test_cancel_of_a_missing_job_is_not_found(cli: Cli, client_env: LocalEnv) -> None:
    namespace = new_namespace(client_env, "cancel")
    fails_with(cli("cancel", "nope", "-n", namespace), Exit.NOT_FOUND, "nope")
