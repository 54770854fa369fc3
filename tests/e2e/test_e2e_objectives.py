"""End to end beyond SFT: a DPO FineTuneJob and a classification FineTuneJob, applied together.

The same real parts as test_e2e.py (kube-apiserver, kcm, the node agent running the trainer
pod as a local process, the operator, versitygw): both jobs reach Succeeded with the metrics
their objective is judged by in status (live progress and the trainer's summary) and in
metrics.json, and each output is the kind its method writes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv import stack, tinymodel
from kubetune_localenv.agents import start_agent
from kubetune_localenv.cluster import LocalEnv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAIN_TIMEOUT = 600.0
WARM = ("red", "yellow", "orange", "purple")


@pytest.fixture(scope="module")
def objectives_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    env = LocalEnv(tmp_path_factory.mktemp("e2e-objectives"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    try:
        stack.install_crd(env)
        stack.start_operator(env)
        yield env
    finally:
        env.stop()


def preference_records(n: int) -> list[dict[str, Any]]:
    """The chosen response names the color after, the rejected one the color before."""
    colors = tinymodel.COLORS
    return [
        {
            "prompt": f"after {colors[i % 8]} comes",
            "chosen": f" {colors[(i + 1) % 8]}",
            "rejected": f" {colors[(i - 1) % 8]}",
        }
        for i in range(n)
    ]


def classification_records(n: int) -> list[dict[str, Any]]:
    colors = tinymodel.COLORS
    return [
        {"text": f"what follows {c}", "label": "warm" if c in WARM else "cool"}
        for c in (colors[i % 8] for i in range(n))
    ]


def _job(env: LocalEnv, namespace: str, bucket: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The tiny job's manifest with its own data (``datasets/<name>/``) and ``spec`` merged in."""
    rendered = stack.render_tiny_job(
        env, name=name, namespace=namespace, bucket=bucket, max_steps=8, save_steps=4
    )
    manifest: dict[str, Any] = yaml.safe_load(rendered.manifest)
    manifest["spec"]["dataset"] |= {
        "train": f"s3://{bucket}/datasets/{name}/train.jsonl",
        "validation": f"s3://{bucket}/datasets/{name}/validation.jsonl",
        "format": "auto",
    }
    for key, value in spec.items():
        manifest["spec"][key] = value
    return manifest


def _upload(env: LocalEnv, bucket: str, name: str, records: list[dict[str, Any]]) -> None:
    client = stack.s3_client(env)
    client.put_object(
        Bucket=bucket, Key=f"datasets/{name}/train.jsonl", Body=tinymodel.to_jsonl(records[:32])
    )
    client.put_object(
        Bucket=bucket, Key=f"datasets/{name}/validation.jsonl", Body=tinymodel.to_jsonl(records[32:])
    )


def _metrics(env: LocalEnv, bucket: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        stack.object_bytes(stack.s3_client(env), bucket, f"adapters/{name}/metrics.json")
    )
    return found


def _finished(env: LocalEnv, namespace: str, name: str) -> dict[str, Any]:
    done: dict[str, Any] = stack.wait_for(
        f"FineTuneJob {name} to finish",
        lambda: stack.phase_in(env, namespace, name, {"Succeeded", "Failed"}),
        TRAIN_TIMEOUT,
    )
    status: dict[str, Any] = done["status"]
    return status


def test_a_dpo_and_a_classification_job_succeed_with_their_metrics_in_status(
    objectives_env: LocalEnv, tmp_path: Path
) -> None:
    env, namespace, bucket = objectives_env, "obj-" + secrets.token_hex(3), "obj-" + secrets.token_hex(4)
    stack.ensure_namespace(env, namespace)
    stack.create_credentials_secret(env, namespace)
    stack.upload_tiny_inputs(env, bucket, tmp_path / "work")
    _upload(env, bucket, "prefs", preference_records(40))
    _upload(env, bucket, "colors-kind", classification_records(48))
    dpo = _job(env, namespace, bucket, "prefs", {"objective": "dpo", "dpo": {"beta": 0.1}})
    classifier = _job(
        env,
        namespace,
        bucket,
        "colors-kind",
        {"task": "sequence-classification", "method": "lora", "quantization": {}},
    )
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(yaml.safe_dump_all([dpo, classifier]))
    env.kubectl("apply", "-f", str(manifest))

    finished = {name: _finished(env, namespace, name) for name in ("prefs", "colors-kind")}
    for status in finished.values():
        assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8

    # DPO: reward accuracy and margin, live in progress and in the trainer's summary.
    prefs = finished["prefs"]
    assert 0.0 <= prefs["progress"]["rewardAccuracy"] <= 1.0
    assert isinstance(prefs["progress"]["rewardMargin"], float)
    assert json.loads(prefs["message"])["objective"] == "dpo"
    dpo_metrics = _metrics(env, bucket, "prefs")
    assert dpo_metrics["objective"] == "dpo"
    assert dpo_metrics["evalRewardAccuracy"] is not None

    # Classification: accuracy and F1 on the validation data, in progress and metrics.json.
    kind = finished["colors-kind"]
    assert 0.0 <= kind["progress"]["evalAccuracy"] <= 1.0
    assert 0.0 <= kind["progress"]["evalF1"] <= 1.0
    summary = json.loads(kind["message"])
    cls_metrics = _metrics(env, bucket, "colors-kind")
    assert summary["evalAccuracy"] == pytest.approx(cls_metrics["evalAccuracy"])
    assert set(cls_metrics["labels"]) == {"cool", "warm"}
    outputs = stack.folder_objects(stack.s3_client(env), bucket, "adapters/colors-kind")
    assert {"adapter_model.safetensors", "manifest.json"} <= set(outputs)
