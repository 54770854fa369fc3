"""A 200-trial FineTuneSweep on the local control plane: the operator's reconcile time and the
sweep's status size as the history grows.

The control plane is the one the tests use (etcd, kube-apiserver, kube-controller-manager), the
operator runs as its own process (``python -m kubetune_operator``), and this script plays kubelet
and trainer for every trial: it writes the trial pod's status (Running, then Succeeded with exit
0) and the trial's ``status.progress.loss`` from a known landscape, so the Job controller
completes the Job and the operator marks the trial Succeeded. No pod runs anything.

Two figures:

- the sweep end to end: wall time of the 200 trials, at most ``maxParallel`` at once (checked on
  every poll), and the size in bytes of the sweep's ``status`` (compact JSON, as etcd stores it)
  when 50, 100 and 200 trials are recorded;
- the reconcile's own work, timed in this process on the histories the live sweep recorded (one
  timing per trial count n = 1..200): what ``SweepReconciler.sync`` computes between its list and
  its patches (``sweep.observe`` of the n trial FineTuneJobs, ``to_prune``, one ``next_parameters``
  (the study rebuilt from n records, one TPE ask), ``compute`` and ``status_patch``), p50/p99/max.
  API round trips are left out: they are the API server's, and the end-to-end wall time has them.

    .venv/bin/python bench/bench_sweep_scale.py --trials 200 --parallel 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import urllib3

from kubetune_api.sweep import MAX_TRIALS, FineTuneSweepSpec
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv
from kubetune_operator import sweep
from kubetune_operator.kube import FINETUNEJOBS, PODS, Kube, KubeError
from kubetune_operator.sweep_reconcile import SWEEPS

COMMAND = "python bench/bench_sweep_scale.py"
NAMESPACE = "sweep"
NAME = "scale"
LR = "training.learningRate"
SIZES_AT = (50, 100, 200)
Obj = dict[str, Any]


def landscape(parameters: Obj) -> float:
    """The loss the test reports: minimum 0.5 at learningRate 1e-3, rank 16."""
    return (math.log10(float(parameters[LR])) + 3) ** 2 + abs(int(parameters["lora.r"]) - 16) / 32 + 0.5


def sweep_body(trials: int, parallel: int) -> Obj:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "template": {
                "model": {"source": "s3://models/tiny-llama"},
                "dataset": {"train": "s3://data/train.jsonl"},
                "output": {"uri": "s3://results/scale"},
                "resources": {"gpus": 1},
            },
            "searchSpace": [
                {"path": LR, "low": 1e-5, "high": 1e-1, "log": True},
                {"path": "lora.r", "choices": [8, 16, 32, 64]},
            ],
            "objective": {"metric": "loss"},
            "maxTrials": trials,
            "maxParallel": parallel,
            "seed": 7,
        },
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_status(kube: Kube, pod: Obj, phase: str, state: Obj) -> None:
    container = {
        "name": "trainer",
        "image": pod["spec"]["containers"][0]["image"],
        "imageID": "",
        "ready": phase == "Running",
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }
    kube.patch(
        PODS,
        NAMESPACE,
        pod["metadata"]["name"],
        {"status": {"phase": phase, "containerStatuses": [container]}},
        "status",
    )


def finish(kube: Kube, ftj: Obj, pod: Obj) -> None:
    """Play the trainer and kubelet of one trial: report its loss, then end its pod with exit 0."""
    parameters = json.loads(ftj["metadata"]["annotations"][sweep.ANNOTATION_PARAMETERS])
    progress = {"progress": {"step": 10, "totalSteps": 10, "loss": landscape(parameters)}}
    kube.patch(FINETUNEJOBS, NAMESPACE, ftj["metadata"]["name"], {"status": progress}, "status")
    _pod_status(kube, pod, "Running", {"running": {"startedAt": _now()}})
    done = {"exitCode": 0, "reason": "Completed", "startedAt": _now(), "finishedAt": _now()}
    _pod_status(kube, pod, "Succeeded", {"terminated": done})


def drive(kube: Kube, trials: int, parallel: int, timeout: float) -> tuple[float, dict[int, int], int, Obj]:
    """Finish every trial as its pod appears; the wall time, status bytes at SIZES_AT, the most
    unfinished trials seen at once, and the final sweep."""
    started = time.monotonic()
    sizes: dict[int, int] = {}
    finished: set[str] = set()
    most = 0
    reported = -1
    while True:
        body = kube.get(SWEEPS, NAMESPACE, NAME) or {}
        status = body.get("status") or {}
        recorded = len(status.get("trials") or [])
        for mark in SIZES_AT:
            if recorded >= mark and mark not in sizes:
                sizes[mark] = len(json.dumps(status, separators=(",", ":")))
        if status.get("phase") in ("Succeeded", "Failed"):
            return time.monotonic() - started, sizes, most, body
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the sweep did not end within {timeout:.0f}s: {status.get('trialsSummary')}")
        ftjs = kube.list(FINETUNEJOBS, NAMESPACE, f"{sweep.LABEL_SWEEP}={NAME}")
        unfinished = [
            f
            for f in ftjs
            if (f.get("status") or {}).get("phase") not in ("Succeeded", "Failed", "Cancelled")
        ]
        most = max(most, len(unfinished))
        if len(unfinished) > parallel:
            raise AssertionError(f"{len(unfinished)} trials unfinished at once, maxParallel {parallel}")
        pods = {
            p["metadata"]["labels"].get("kubetune.dev/finetunejob"): p for p in kube.list(PODS, NAMESPACE)
        }
        for ftj in unfinished:
            name = ftj["metadata"]["name"]
            pod = pods.get(name)
            if (
                name not in finished
                and pod is not None
                and (pod.get("status") or {}).get("phase") in (None, "Pending")
            ):
                finish(kube, ftj, pod)
                finished.add(name)
        if len(finished) // 20 != reported:
            reported = len(finished) // 20
            print(
                f"  {len(finished)}/{trials} trials finished after {time.monotonic() - started:.1f}s",
                flush=True,
            )
        time.sleep(0.2)


def reconcile_times(body: Obj, ftjs: list[Obj]) -> list[float]:
    """The pure part of one reconcile, timed with the first n recorded trials for n = 1..all."""
    spec = FineTuneSweepSpec.model_validate(body["spec"])
    metric = spec.objective.metric
    by_number = sorted(ftjs, key=lambda f: int(f["metadata"]["labels"][sweep.LABEL_TRIAL]))
    recorded = sorted(body["status"]["trials"], key=lambda t: int(t["number"]))
    now = datetime.datetime.now(datetime.UTC)
    times = []
    for n in range(1, len(recorded) + 1):
        previous = {**body, "status": {**body["status"], "trials": recorded[:n]}}
        started = time.perf_counter()
        trials = sweep.observe(previous, by_number[:n], metric)
        sweep.to_prune(spec, trials)
        sweep.next_parameters(spec, trials, n)
        desired = sweep.compute(previous, spec, trials, now)
        sweep.status_patch(previous["status"], desired)
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(
    *,
    trials: int,
    parallel: int,
    wall: float,
    sizes: dict[int, int],
    most: int,
    body: Obj,
    times: list[float],
) -> None:
    status = body["status"]
    print(f"sweep: {trials} trials, maxParallel {parallel}, TPE over learningRate (log) x lora.r")
    print(
        f"phase {status['phase']}, {status['trialsSummary']} ended, {status['trialsSucceeded']} succeeded; "
        f"best {status['bestValue']:.4f} ({status['bestTrial']}) {status['bestParameters']}"
    )
    print(
        f"end to end: {wall:.1f}s for {trials} trials; at most {most} unfinished at once (limit {parallel})"
    )
    print("status size (compact JSON bytes): " + ", ".join(f"{n} trials {sizes[n]:,}" for n in sorted(sizes)))
    ms = [t * 1000 for t in times]
    print(
        f"reconcile (pure part: observe, prune, rebuild + 1 TPE ask, compute, patch) over n = 1..{len(ms)}: "
        f"p50 {statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms; "
        f"at n = 50/100/200: " + "/".join(f"{ms[n - 1]:.1f}" for n in SIZES_AT if n <= len(ms)) + " ms"
    )
    print(f"reproduce: {COMMAND} --trials {trials} --parallel {parallel}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=200, help=f"maxTrials (at most {MAX_TRIALS})")
    parser.add_argument("--parallel", type=int, default=20, help="maxParallel")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    trials = min(args.trials, MAX_TRIALS)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        env = LocalEnv(Path(tmp), with_s3=False)
        env.start()
        try:
            stack.install_crd(env)  # both CRDs
            stack.ensure_namespace(env, NAMESPACE)
            stack.start_operator(env, [NAMESPACE])
            kube = Kube.connect(env.kubeconfig)
            stack.wait_for("the API server serving sweeps", lambda: _serving(kube), 60)
            kube.request("POST", SWEEPS.path(NAMESPACE), sweep_body(trials, args.parallel))
            wall, sizes, most, body = drive(kube, trials, args.parallel, args.timeout)
            ftjs = kube.list(FINETUNEJOBS, NAMESPACE, f"{sweep.LABEL_SWEEP}={NAME}")
        finally:
            env.stop()
    times = reconcile_times(body, ftjs)
    report(trials=trials, parallel=args.parallel, wall=wall, sizes=sizes, most=most, body=body, times=times)
    return 0 if body["status"]["phase"] == "Succeeded" else 1


def _serving(kube: Kube) -> bool:
    try:
        kube.list(SWEEPS, NAMESPACE)
    except (KubeError, urllib3.exceptions.HTTPError):  # a fresh API server answers 429 for a while
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
