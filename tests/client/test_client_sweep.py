"""``kubetune sweep`` against the real control plane and the real operator (its own process).

The test plays the trainers' part, as tests/operator/test_sweep_operator.py does: the trials ask
for a GPU, which the CPU-only node agent never binds, so no trainer runs; the test writes each
trial pod's status as a kubelet would and the trainer's status.progress with the loss of a known
landscape, then ends the pod with exit 0, and the operator marks the trial Succeeded.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv.cluster import LocalEnv
from kubetune_localenv.stack import wait_for
from kubetune_operator.kube import FINETUNEJOBS, PODS, Kube
from kubetune_operator.sweep_reconcile import SWEEPS

from .conftest import Cli, fails_with, new_namespace

pytestmark = pytest.mark.cluster
LR = "training.learningRate"
CHOICES = [1e-4, 1e-3, 1e-2]
Obj = dict[str, Any]


def landscape(lr: float) -> float:
    """The known landscape: its minimum, 0.5, at learningRate 1e-3."""
    return (math.log10(lr) + 3) ** 2 + 0.5


@pytest.fixture(scope="module")
def sweep_ns(client_env: LocalEnv) -> str:
    """A namespace of this module's own (client_env installs the sweep CRD before the operator)."""
    return new_namespace(client_env, "sweep")


@pytest.fixture(scope="module")
def kube(client_env: LocalEnv) -> Kube:
    return Kube.connect(client_env.kubeconfig)


def manifest(tmp_path: Path, name: str, **spec: Any) -> Path:
    body = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "model": {"source": "s3://models/tiny-llama"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://results/sweep"},
                "resources": {"gpus": 1},  # never bound by the CPU-only node agent: the test is the kubelet
            },
            "objective": {"metric": "loss"},
            **spec,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_status(kube: Kube, ns: str, pod: Obj, phase: str, state: Obj) -> None:
    container = {
        "name": "trainer",
        "image": pod["spec"]["containers"][0]["image"],
        "imageID": "",
        "ready": phase == "Running",
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }
    patch = {"status": {"phase": phase, "containerStatuses": [container]}}
    kube.patch(PODS, ns, pod["metadata"]["name"], patch, "status")


def finish_trial(kube: Kube, ns: str, name: str, loss: float) -> None:
    """Play kubelet and trainer for one trial: run its pod, report the loss, exit 0."""

    def pending_pod() -> Obj | None:
        pods = kube.list(PODS, ns, f"kubetune.dev/finetunejob={name}")
        live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending")]
        return live[0] if live else None

    pod = wait_for(f"a trainer pod of {name}", pending_pod, 60)
    _pod_status(kube, ns, pod, "Running", {"running": {"startedAt": _now()}})
    progress = {"progress": {"step": 10, "totalSteps": 10, "loss": loss}}
    kube.patch(FINETUNEJOBS, ns, name, {"status": progress}, "status")
    done = {"exitCode": 0, "reason": "Completed", "startedAt": _now(), "finishedAt": _now()}
    _pod_status(kube, ns, pod, "Succeeded", {"terminated": done})

    def succeeded() -> bool:
        return ((kube.get(FINETUNEJOBS, ns, name) or {}).get("status") or {}).get("phase") == "Succeeded"

    wait_for(f"{name} Succeeded", succeeded, 60)


def drive(kube: Kube, ns: str, sweep: str, deadline_s: float) -> None:
    """Finish the sweep's trials one at a time until the sweep ends."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = (kube.get(SWEEPS, ns, sweep) or {}).get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            return
        assert time.monotonic() < deadline, f"the sweep did not end: {status}"
        ftjs = kube.list(FINETUNEJOBS, ns, f"kubetune.dev/sweep={sweep}")
        running = [
            f
            for f in ftjs
            if (f.get("status") or {}).get("phase") not in ("Succeeded", "Failed", "Cancelled")
        ]
        if not running:
            time.sleep(0.3)
            continue
        ftj = min(running, key=lambda f: int(f["metadata"]["labels"]["kubetune.dev/trial"]))
        lr = float(json.loads(ftj["metadata"]["annotations"]["kubetune.dev/trial-parameters"])[LR])
        finish_trial(kube, ns, ftj["metadata"]["name"], landscape(lr))


def test_sweep_run_status_list_through_a_whole_sweep(
    cli: Cli, kube: Kube, sweep_ns: str, tmp_path: Path
) -> None:
    space = [{"path": LR, "choices": CHOICES}]
    path = manifest(tmp_path, "cli-grid", searchSpace=space, sampler="grid", maxTrials=3, maxParallel=2)
    result = cli("sweep", "run", "-f", str(path), "-n", sweep_ns)
    assert result.exit_code == 0, result.output
    assert f"finetunesweep.kubetune.dev/cli-grid created in namespace {sweep_ns}" in result.stdout

    def two_trials() -> Any:
        return (
            len(kube.list(FINETUNEJOBS, sweep_ns, "kubetune.dev/sweep=cli-grid")) == 2
            and cli.json("sweep", "status", "cli-grid", "-n", sweep_ns).get("status", {}).get("trialsRunning")
            == 2
        )

    wait_for("two trials running", two_trials, 60)
    running = cli("sweep", "status", "cli-grid", "-n", sweep_ns, "--watch", "--timeout", "3")
    fails_with(running, 10, "cli-grid", "did not end within 3s")
    assert "cli-grid: Running (TrialsRunning) 0/3 ended" in running.stdout
    table = cli("sweep", "status", "cli-grid", "-n", sweep_ns)
    assert table.exit_code == 0, table.output
    assert all(word in table.stdout for word in ("cli-grid-0", "cli-grid-1", "Running")), table.stdout

    drive(kube, sweep_ns, "cli-grid", deadline_s=180)

    body = cli.json("sweep", "status", "cli-grid", "-n", sweep_ns)
    status = body["status"]
    best = next(t for t in status["trials"] if t["parameters"][LR] == 1e-3)
    assert (status["phase"], status["bestTrial"], status["bestValue"]) == ("Succeeded", best["name"], 0.5)
    watched = cli("sweep", "status", "cli-grid", "-n", sweep_ns, "--watch", "--timeout", "30")
    assert watched.exit_code == 0, watched.output
    out = watched.stdout
    counts = "3/3 ended: 3 succeeded, 0 pruned, 0 failed; 0 running"
    assert f"cli-grid: Succeeded (Completed) {counts}; best 0.5 ({best['name']})" in out
    assert "Best parameters  learningRate=0.001" in out
    for trial in status["trials"]:
        lr = trial["parameters"][LR]
        row = next(line for line in out.splitlines() if line.startswith(trial["name"]))
        assert all(word in row for word in (f"learningRate={lr:.4g}", "Succeeded", f"{landscape(lr):.4g}")), (
            row
        )
        assert row.startswith(best["name"] + " *") == (trial["name"] == best["name"])  # the best is marked

    listed = cli("sweep", "list", "-n", sweep_ns)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith("cli-grid"))
    assert row.split()[:5] == ["cli-grid", "Succeeded", "3/3", "0", "0.5"]
    assert [i["metadata"]["name"] for i in cli.json("sweep", "list", "-n", sweep_ns)["items"]] == ["cli-grid"]


def test_sweep_run_refuses_a_bad_sweep_before_the_cluster_sees_it(
    cli: Cli, kube: Kube, sweep_ns: str, tmp_path: Path
) -> None:
    grid_range = manifest(
        tmp_path, "bad-grid", searchSpace=[{"path": LR, "low": 1e-5, "high": 1e-3}], sampler="grid"
    )
    fails_with(cli("sweep", "run", "-f", str(grid_range), "-n", sweep_ns), 7, "sampler grid needs choices")
    bits = manifest(tmp_path, "bad-bits", searchSpace=[{"path": "quantization.bits", "choices": [4, 8]}])
    fails_with(cli("sweep", "run", "-f", str(bits), "-n", sweep_ns), 7, "searchSpace quantization.bits")
    dry = manifest(tmp_path, "dry", searchSpace=[{"path": LR, "choices": CHOICES}])
    result = cli("sweep", "run", "-f", str(dry), "-n", sweep_ns, "--dry-run", "--name", "dry-2")
    assert result.exit_code == 0, result.output
    assert "dry-2 validated by the API server (dry run, nothing created)" in result.stdout
    assert kube.get(SWEEPS, sweep_ns, "dry-2") is None
    fails_with(cli("sweep", "status", "nope", "-n", sweep_ns), 5, "FineTuneSweep nope not found")
