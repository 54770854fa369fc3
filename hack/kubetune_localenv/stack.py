"""The whole product on one machine: control plane + node agent + operator + S3 data.

Shared by ``make demo`` (``demo.py``) and the end-to-end tests, so both run the
same path a user takes: the CRD applied, the operator running as its own
process, a FineTuneJob ``kubectl apply``-ed from ``examples/local/``.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import coordinates, crd, sweep

from . import tinymodel, tools
from .cluster import LocalEnv, ManagedProcess, pick_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / crd.CRD_FILE
SWEEP_CRD_FILE = REPO_ROOT / crd.SWEEP_CRD_FILE
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
TINY_JOB_TEMPLATE = REPO_ROOT / "examples" / "local" / "finetunejob-tiny.yaml"
CREDENTIALS_SECRET = "s3-credentials"


def start_operator(env: LocalEnv, namespaces: list[str] | None = None) -> ManagedProcess:
    """Run ``python -m kubetune_operator`` as its own process, as a Deployment would."""
    proc_env = dict(os.environ)
    proc_env.update(
        KUBECONFIG=str(env.kubeconfig),
        KUBETUNE_NAMESPACES=",".join(namespaces or []),
        KUBETUNE_BIND_ADDRESS="127.0.0.1",
        KUBETUNE_METRICS_PORT=str(pick_port()),
        KUBETUNE_HEALTH_PORT=str(pick_port()),
        PYTHONUNBUFFERED="1",
    )
    proc = ManagedProcess(
        "operator",
        [sys.executable, "-m", "kubetune_operator"],
        env.logs_dir / "operator.log",
        proc_env,
    )
    proc.start()
    env.processes.append(proc)  # stopped with the rest of the environment
    return proc


def helm_env(home: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    """Environment for helm with its cache/config/data under ``home`` (never the user's own)."""
    env = dict(
        os.environ,
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def helm(env: LocalEnv, *args: str) -> str:
    """Run the pinned, Go-built helm against ``env`` with its state under the env's folder."""
    argv = [str(tools.build("helm", quiet=True)), *args]
    run_env = helm_env(env.state_dir / "helm", env.kubeconfig)
    proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def install_with_helm(
    env: LocalEnv, namespace: str = "kubetune-system", values: Mapping[str, Any] | None = None
) -> str:
    """``helm install`` the chart: CRDs, RBAC and the operator Deployment, whose pod the node
    agent runs (image ghcr.io/kubetune/operator maps to this repo's environment).

    One replica, and its metrics/health endpoints on free loopback ports: on this machine pods
    share the host's network. ``values``: more chart values on top (e.g. the images' tags).
    """
    chart_values = {
        "replicaCount": 1,
        "metrics": {"port": pick_port(), "service": {"enabled": False}},
        "health": {"port": pick_port()},
        "extraEnv": [{"name": "KUBETUNE_BIND_ADDRESS", "value": "127.0.0.1"}],
        **(values or {}),
    }
    values_file = env.state_dir / f"values-{namespace}.json"
    values_file.write_text(json.dumps(chart_values))
    out = helm(
        env,
        "install",
        "kubetune",
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--create-namespace",
        "--values",
        str(values_file),
        "--wait",
        "--timeout",
        "5m",
    )
    return out


def install_crd(env: LocalEnv) -> None:
    """Both kubetune CRDs (FineTuneJob, FineTuneSweep), before any operator starts: kopf serves a
    CRD created after it started only once its observer notices it (trials were lost for a minute)."""
    for path, name in ((CRD_FILE, coordinates.CRD_NAME), (SWEEP_CRD_FILE, sweep.CRD_NAME)):
        env.kubectl("apply", "--server-side", "-f", str(path))
        env.wait_established(name)


def s3_client(env: LocalEnv) -> Any:
    import boto3

    assert env.s3 is not None
    return boto3.client(
        "s3",
        endpoint_url=env.s3.endpoint,
        aws_access_key_id=env.s3.access_key,
        aws_secret_access_key=env.s3.secret_key,
        region_name=env.s3.region,
    )


@dataclass
class TinyJob:
    """A prepared tiny fine-tune: data and model in S3, a Secret, a manifest to apply."""

    name: str
    namespace: str
    bucket: str
    manifest: str

    @property
    def output_prefix(self) -> str:
        return f"adapters/{self.name}"


def folder_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under the folder ``prefix``: its key relative to the folder -> its size."""
    folder = prefix.rstrip("/") + "/" if prefix else ""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(folder) :]] = obj["Size"]
    return found


def object_bytes(client: Any, bucket: str, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def upload_tiny_inputs(env: LocalEnv, bucket: str, work: Path, fmt: str = "chat") -> None:
    """Create ``bucket`` with the tiny model and a train/validation split of ``fmt`` records."""
    client = s3_client(env)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    model_dir = work / "tiny-llama"
    if not (model_dir / "config.json").exists():
        tinymodel.build_model(model_dir)
    tinymodel.upload_folder(client, model_dir, bucket, "models/tiny-llama")
    records = tinymodel.RECORDS[fmt](48)
    client.put_object(Bucket=bucket, Key="datasets/colors/train.jsonl", Body=tinymodel.to_jsonl(records[:40]))
    client.put_object(
        Bucket=bucket, Key="datasets/colors/validation.jsonl", Body=tinymodel.to_jsonl(records[40:])
    )


def create_credentials_secret(env: LocalEnv, namespace: str) -> None:
    """The S3 keys, by reference only: the FineTuneJob names this Secret."""
    assert env.s3 is not None
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace},
        "stringData": {
            "AWS_ACCESS_KEY_ID": env.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": env.s3.secret_key,
        },
    }
    env.kubectl("apply", "-f", "-", input=json.dumps(secret))


def ensure_namespace(env: LocalEnv, namespace: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    env.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def render_tiny_job(
    env: LocalEnv,
    *,
    name: str,
    namespace: str,
    bucket: str,
    fmt: str = "chat",
    max_steps: int = 24,
    save_steps: int = 8,
) -> TinyJob:
    assert env.s3 is not None
    manifest = string.Template(TINY_JOB_TEMPLATE.read_text()).substitute(
        NAME=name,
        NAMESPACE=namespace,
        BUCKET=bucket,
        FORMAT=fmt,
        MAX_STEPS=max_steps,
        SAVE_STEPS=save_steps,
        S3_ENDPOINT=env.s3.endpoint,
    )
    return TinyJob(name, namespace, bucket, manifest)


def get_ftj(env: LocalEnv, namespace: str, name: str) -> dict[str, Any]:
    out = env.kubectl("get", "finetunejob", name, "-n", namespace, "-o", "json")
    result: dict[str, Any] = json.loads(out)
    return result


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 60.0,
    on_tick: Callable[[], None] | None = None,
    interval: float = 0.25,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if on_tick:
            on_tick()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def phase_in(env: LocalEnv, namespace: str, name: str, phases: set[str]) -> dict[str, Any] | None:
    obj = get_ftj(env, namespace, name)
    return obj if obj.get("status", {}).get("phase") in phases else None
