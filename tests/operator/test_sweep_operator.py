"""FineTuneSweep against the real kube-apiserver and kube-controller-manager, with the real operator.

There is no trainer: the test plays its part (and the kubelet's) for each trial: it runs the
trial's pod, patches status.progress with the metric of a known landscape, and ends the pod with
exit code 0, so the Job controller completes the Job and the operator marks the FineTuneJob
Succeeded, as a real run would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from kubetune_api.crd import SWEEP_CRD_FILE
from kubetune_localenv.cluster import ManagedProcess
from kubetune_localenv.stack import wait_for as wait_for_api
from kubetune_operator.kube import FINETUNEJOBS, KubeError
from kubetune_operator.sweep import ANNOTATION_PARAMETERS, ANNOTATION_PRUNED, LABEL_SWEEP
from kubetune_operator.sweep_reconcile import SWEEPS

Obj = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"
FakeKubelet = Any  # tests/operator/conftest.py's, through the kubelet fixture


def minimal_spec() -> Obj:
    return {
        "model": {"source": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://results/run-1"},
        "resources": {"gpus": 0},
    }


pytestmark = pytest.mark.cluster
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def landscape(lr: float) -> float:
    """The known landscape: its minimum, 0.5, at learningRate 1e-3."""
    return (math.log10(lr) + 3) ** 2 + 0.5


@pytest.fixture(scope="module")
def sweep_crd(local_env: Any, crd_installed: Obj, kube: Any) -> None:
    local_env.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / SWEEP_CRD_FILE))
    local_env.wait_established("finetunesweeps.kubetune.dev")

    def serving() -> bool:
        # A fresh API server answers 429 until its priority-and-fairness config is in place.
        try:
            kube.list(SWEEPS, "default")
            kube.list(FINETUNEJOBS, "default")
        except (KubeError, urllib3.exceptions.HTTPError):
            return False
        return True

    wait_for_api("the API server serving lists", serving, 60)


def create_sweep(kube: Any, body: Obj) -> Obj:
    created: Obj = kube.request("POST", SWEEPS.path(body["metadata"]["namespace"]), body)
    return created


def sweep_body(name: str, namespace: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": minimal_spec(), "objective": {"metric": "loss"}, **spec},
    }


class Trials:
    """Reads a sweep and its trials, and plays the trainer of one trial."""

    def __init__(
        self, kube: Any, kubelet: FakeKubelet, namespace: str, sweep: str, wait_for: Callable[..., Any]
    ):
        self.kube, self.kubelet, self.namespace, self.sweep, self.wait_for = (
            kube,
            kubelet,
            namespace,
            sweep,
            wait_for,
        )

    def jobs(self) -> list[Obj]:
        items: list[Obj] = self.kube.list(FINETUNEJOBS, self.namespace, f"{LABEL_SWEEP}={self.sweep}")
        return sorted(items, key=lambda f: int(f["metadata"]["labels"]["kubetune.dev/trial"]))

    def unfinished(self) -> list[Obj]:
        return [f for f in self.jobs() if (f.get("status") or {}).get("phase") not in TERMINAL]

    def status(self) -> Obj:
        body: Obj = self.kube.get(SWEEPS, self.namespace, self.sweep) or {}
        status: Obj = body.get("status") or {}
        return status

    def report(self, name: str, step: int, loss: float) -> None:
        progress = {"progress": {"step": step, "totalSteps": 10, "loss": loss}}
        self.kube.patch(FINETUNEJOBS, self.namespace, name, {"status": progress}, "status")

    def start(self, name: str) -> Obj:
        pod: Obj = self.kubelet.wait_pod(name, timeout=60)
        self.kubelet.run(pod)
        return pod

    def finish(self, name: str, loss: float) -> None:
        pod = self.start(name)
        self.report(name, 10, loss)
        self.kubelet.terminate(pod, 0, reason="Completed", message="training completed")

        def done() -> bool:
            ftj = self.kube.get(FINETUNEJOBS, self.namespace, name) or {}
            return (ftj.get("status") or {}).get("phase") == "Succeeded"

        self.wait_for(f"{name} Succeeded", done, 60)


def lr_of(ftj: Obj) -> float:
    return float(json.loads(ftj["metadata"]["annotations"][ANNOTATION_PARAMETERS])["training.learningRate"])


def drive(
    trials: Trials, max_parallel: int, deadline_s: float, between: Callable[[int], None] | None = None
) -> int:
    """Finish trials one at a time until the sweep ends; the most unfinished trials seen at once."""
    most = 0
    finished = 0
    deadline = time.monotonic() + deadline_s
    while trials.status().get("phase") not in ("Succeeded", "Failed"):
        assert time.monotonic() < deadline, f"the sweep did not end: {trials.status()}"
        unfinished = trials.unfinished()
        most = max(most, len(unfinished))
        assert len(unfinished) <= max_parallel, [f["metadata"]["name"] for f in unfinished]
        if not unfinished:
            time.sleep(0.3)
            continue
        ftj = unfinished[0]
        trials.finish(ftj["metadata"]["name"], landscape(lr_of(ftj)))
        finished += 1
        if between is not None:
            between(finished)
    return most


def test_invalid_sweeps_are_refused_by_the_api_server_with_what_to_fix(
    kube: Any, namespace: str, sweep_crd: None
) -> None:
    cases: list[tuple[Obj, str]] = [
        (
            {"searchSpace": [{"path": "output.uri", "choices": ["s3://a/b"]}]},
            "must be a numeric or categorical",
        ),
        ({"searchSpace": [{"path": "lora.r", "low": 4.5, "high": 64}]}, "low and high must be whole numbers"),
        ({"searchSpace": [{"path": "training.learningRate", "low": 0.1, "high": 3}]}, "at most 1"),
        (
            {"searchSpace": [{"path": "lora.r", "choices": [8]}], "objective": {"metric": "evalLoss"}},
            "objective.metric evalLoss needs evaluation",
        ),
    ]
    for spec, expected in cases:
        with pytest.raises(KubeError) as caught:
            create_sweep(kube, sweep_body("bad", namespace, **spec))
        assert caught.value.status == 422
        assert expected in caught.value.message, caught.value.message
    created = create_sweep(
        kube, sweep_body("good", namespace, searchSpace=[{"path": "lora.r", "choices": [8, 16, True]}])
    )
    with pytest.raises(KubeError) as caught:
        kube.patch(SWEEPS, namespace, "good", {"spec": {"seed": 7}})
    assert "seed is immutable once the FineTuneSweep is created" in caught.value.message
    kube.patch(SWEEPS, namespace, "good", {"spec": {"maxParallel": 3}})
    assert created["spec"]["sampler"] == "tpe"


def test_grid_sweep_finds_the_minimum_within_max_parallel(  # noqa: PLR0917
    kube: Any,
    namespace: str,
    kubelet: FakeKubelet,
    wait_for: Callable[..., Any],
    sweep_crd: None,
    operator: Any,
) -> None:
    choices = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    body = sweep_body(
        "grid",
        namespace,
        searchSpace=[{"path": "training.learningRate", "choices": choices}],
        sampler="grid",
        maxTrials=10,
        maxParallel=2,
    )
    create_sweep(kube, body)
    trials = Trials(kube, kubelet, namespace, "grid", wait_for)
    most = drive(trials, max_parallel=2, deadline_s=240)
    assert most == 2  # it did run two at once
    status = trials.status()
    assert status["phase"] == "Succeeded", status
    assert status["bestTrial"] == next(f["metadata"]["name"] for f in trials.jobs() if lr_of(f) == 1e-3)
    assert status["bestParameters"] == {"training.learningRate": 1e-3}
    assert status["bestValue"] == pytest.approx(0.5)
    assert status["trialsSummary"] == "5/5"  # the grid holds 5 points, fewer than maxTrials
    jobs = trials.jobs()
    assert sorted(lr_of(f) for f in jobs) == choices  # every point once
    for ftj in jobs:
        name = ftj["metadata"]["name"]
        assert ftj["spec"]["output"]["uri"] == f"s3://results/run-1/{name}"
        assert ftj["spec"]["training"]["learningRate"] == lr_of(ftj)
        assert ftj["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSweep"
    recorded = {t["name"]: t for t in status["trials"]}
    assert all(recorded[f["metadata"]["name"]]["state"] == "Succeeded" for f in jobs)
    events = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("kind") == "FineTuneSweep"}
    assert {"TrialCreated", "TrialEnded", "Succeeded"} <= reasons, reasons


def test_a_pruned_trial_is_cancelled_and_marked(  # noqa: PLR0917
    kube: Any,
    namespace: str,
    kubelet: FakeKubelet,
    wait_for: Callable[..., Any],
    sweep_crd: None,
    operator: Any,
) -> None:
    body = sweep_body(
        "prune",
        namespace,
        searchSpace=[{"path": "training.learningRate", "low": 1e-5, "high": 1e-1, "log": True}],
        maxTrials=2,
        pruner={"type": "median", "startupTrials": 1},
    )
    create_sweep(kube, body)
    trials = Trials(kube, kubelet, namespace, "prune", wait_for)
    wait_for("trial prune-0", lambda: [f for f in trials.jobs() if f["metadata"]["name"] == "prune-0"], 30)
    trials.start("prune-0")
    trials.report("prune-0", 5, 1.0)

    def seen(name: str, step: int) -> bool:
        record: Obj = next((t for t in trials.status().get("trials") or [] if t["name"] == name), {})
        return any(p["step"] == step for p in record.get("intermediateValues") or [])

    wait_for("prune-0's step 5 recorded", lambda: seen("prune-0", 5), 30)
    trials.finish("prune-0", 0.9)
    wait_for("trial prune-1", lambda: [f for f in trials.jobs() if f["metadata"]["name"] == "prune-1"], 30)
    trials.start("prune-1")
    trials.report("prune-1", 3, 40.0)  # no finished trial reported step 3: nothing to compare with
    wait_for("prune-1's step 3 recorded", lambda: seen("prune-1", 3), 30)
    assert not (kube.get(FINETUNEJOBS, namespace, "prune-1") or {})["spec"].get("cancel")
    trials.report("prune-1", 5, 50.0)  # far worse than prune-0 at step 5

    def cancelled() -> Obj | None:
        ftj = kube.get(FINETUNEJOBS, namespace, "prune-1") or {}
        return ftj if ftj.get("spec", {}).get("cancel") else None

    ftj = wait_for("prune-1 cancelled", cancelled, 30)
    assert ftj["metadata"]["annotations"][ANNOTATION_PRUNED] == "true"
    wait_for(
        "prune-1 Cancelled",
        lambda: (
            (kube.get(FINETUNEJOBS, namespace, "prune-1") or {}).get("status", {}).get("phase") == "Cancelled"
        ),
        60,
    )
    wait_for("the sweep Succeeded", lambda: trials.status().get("phase") == "Succeeded", 30)
    status = trials.status()
    record = next(t for t in status["trials"] if t["name"] == "prune-1")
    assert record["state"] == "Pruned"
    assert (status["trialsPruned"], status["trialsSucceeded"], status["bestTrial"]) == (1, 1, "prune-0")


class OperatorProcess:
    """``python -m kubetune_operator`` as in its Deployment, SIGKILLed and started again."""

    def __init__(self, env: Any, namespace: str, logs: Path) -> None:
        self.env, self.namespace, self.logs, self.starts = env, namespace, logs, 0
        self.proc: ManagedProcess | None = None

    def spawn(self) -> None:
        self.starts += 1
        environment = {
            **os.environ,
            "KUBECONFIG": str(self.env.kubeconfig),
            "KUBETUNE_NAMESPACES": self.namespace,
            "KUBETUNE_TRAINER_IMAGE": TRAINER_IMAGE,
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_PEERING": "",
            "PYTHONUNBUFFERED": "1",
        }
        argv = [sys.executable, "-m", "kubetune_operator"]
        self.proc = ManagedProcess("operator", argv, self.logs / f"operator-{self.starts}.log", environment)
        self.proc.start()

    def kill(self) -> None:
        assert self.proc is not None
        assert self.proc.popen is not None
        self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait(30)


def test_sweep_survives_the_operator_being_killed(  # noqa: PLR0917
    kube: Any,
    local_env: Any,
    namespace: str,
    kubelet: FakeKubelet,
    wait_for: Callable[..., Any],
    sweep_crd: None,
    tmp_path: Path,
) -> None:
    op = OperatorProcess(local_env, namespace, tmp_path)
    op.spawn()
    try:
        create_sweep(
            kube,
            sweep_body(
                "kill",
                namespace,
                searchSpace=[{"path": "training.learningRate", "low": 1e-5, "high": 1e-1, "log": True}],
                maxTrials=6,
                maxParallel=2,
                seed=3,
            ),
        )
        trials = Trials(kube, kubelet, namespace, "kill", wait_for)
        time.sleep(0.5)  # mid-creation, likely: kill before the first status patch lands
        op.kill()
        op.spawn()

        def kill_and_restart(finished: int) -> None:
            if finished in (1, 3, 4):
                op.kill()  # right after a trial ended: the operator may be creating the next one
                op.spawn()

        drive(trials, max_parallel=2, deadline_s=300, between=kill_and_restart)
    finally:
        if op.proc is not None and op.proc.alive():
            op.kill()
    jobs = trials.jobs()
    assert [f["metadata"]["name"] for f in jobs] == [f"kill-{n}" for n in range(6)]  # none lost, none twice
    status = trials.status()
    assert status["phase"] == "Succeeded", status
    assert [t["name"] for t in status["trials"]] == [f"kill-{n}" for n in range(6)]
    for ftj, record in zip(jobs, status["trials"], strict=True):
        assert record["parameters"] == {"training.learningRate": lr_of(ftj)}
        assert record["value"] == pytest.approx(landscape(lr_of(ftj)))
    assert len({lr_of(f) for f in jobs}) == 6  # no trial asked twice
    best = min(jobs, key=lambda f: landscape(lr_of(f)))
    assert status["bestTrial"] == best["metadata"]["name"]
    assert op.starts >= 5


def test_example_sweep_parses() -> None:
    from kubetune_api.sweep import FineTuneSweep

    for document in yaml.safe_load_all((REPO_ROOT / "examples" / "finetunesweep.yaml").read_text()):
        FineTuneSweep.model_validate(document)
    assert subprocess.run([sys.executable, "-c", "import optuna"], check=False).returncode == 0
