"""End to end: a FineTuneSweep over the learning rate with the real trainer.

kubectl apply of a FineTuneSweep → operator → two trial FineTuneJobs → Jobs → node agent → the
trainer (QLoRA of the tiny Llama on CPU) → S3 → each trial's status → the sweep names the best.
Nothing is played by the test: the objective is the evaluation loss the trainer itself reports.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kubetune_client.cli import app
from kubetune_localenv import stack
from kubetune_localenv.agents import start_agent
from kubetune_localenv.cluster import LocalEnv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Two trials of 8 steps each on CPU, run side by side.
SWEEP_TIMEOUT = 900.0
CHOICES = [1e-3, 1e-2]


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    """A control plane of its own, a CPU node agent, both CRDs, then the operator."""
    env = LocalEnv(tmp_path_factory.mktemp("e2e-sweep"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    try:
        stack.install_crd(env)  # both CRDs, before the operator
        stack.start_operator(env)
        yield env
    finally:
        env.stop()


def sweep_manifest(env: LocalEnv, namespace: str, bucket: str) -> dict[str, Any]:
    """The tiny FineTuneJob of `make demo` as the template, its learning rate searched."""
    job = stack.render_tiny_job(env, name="lr", namespace=namespace, bucket=bucket, max_steps=8, save_steps=4)
    template = yaml.safe_load(job.manifest)["spec"]
    template["output"]["uri"] = f"s3://{bucket}/adapters/lr-sweep"
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr", "namespace": namespace},
        "spec": {
            "template": template,
            "searchSpace": [{"path": "training.learningRate", "choices": CHOICES}],
            "objective": {"metric": "evalLoss", "direction": "minimize"},
            "sampler": "grid",
            "maxTrials": 2,
            "maxParallel": 2,
        },
    }


def get(env: LocalEnv, kind: str, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(env.kubectl("get", kind, name, "-n", namespace, "-o", "json"))
    return found


def test_a_learning_rate_sweep_with_the_real_trainer_names_the_best_trial(
    sweep_env: LocalEnv, tmp_path: Path
) -> None:
    namespace = "e2e-sweep-" + secrets.token_hex(3)
    stack.ensure_namespace(sweep_env, namespace)
    stack.create_credentials_secret(sweep_env, namespace)
    bucket = "e2e-sweep-" + secrets.token_hex(4)
    stack.upload_tiny_inputs(sweep_env, bucket, tmp_path / "work")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_manifest(sweep_env, namespace, bucket)))
    sweep_env.kubectl("apply", "-f", str(path))

    def ended() -> dict[str, Any] | None:
        body = get(sweep_env, "finetunesweep", namespace, "lr")
        return body if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    status = stack.wait_for("the sweep to end", ended, SWEEP_TIMEOUT, interval=2.0)["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    trials = {t["name"]: t for t in status["trials"]}
    assert sorted(trials) == ["lr-0", "lr-1"]
    assert sorted(t["parameters"]["training.learningRate"] for t in trials.values()) == CHOICES
    for name, record in trials.items():
        ftj = get(sweep_env, "finetunejob", namespace, name)
        assert ftj["status"]["phase"] == "Succeeded"
        assert record["state"] == "Succeeded"
        assert record["value"] == ftj["status"]["progress"]["evalLoss"]  # the trainer's own number
        assert ftj["spec"]["training"]["learningRate"] == record["parameters"]["training.learningRate"]
    best = min(trials.values(), key=lambda t: t["value"])
    assert (status["bestTrial"], status["bestValue"]) == (best["name"], best["value"])
    assert status["bestParameters"] == best["parameters"]
    outputs = stack.folder_objects(stack.s3_client(sweep_env), bucket, f"adapters/lr-sweep/{best['name']}")
    assert "adapter_model.safetensors" in outputs, sorted(outputs)

    shown = CliRunner().invoke(app, ["sweep", "status", "lr", "-n", namespace], env=sweep_env.env())
    assert shown.exit_code == 0, shown.output
    assert f"{best['name']} *" in shown.stdout
