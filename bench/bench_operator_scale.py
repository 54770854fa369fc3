"""Operator overhead at scale: N FineTuneJobs through the operator vs. the same N Jobs made directly.

Both runs use the same local control plane (etcd, kube-apiserver, kcm, kube-scheduler) and kwok
fake GPU nodes, which mark pods Running and complete Job pods without running anything. The
baseline creates the Jobs the operator would create (same builder, same pod template) straight
through the API and waits until every Job has succeeded; the operator run creates N
FineTuneJobs and waits until every one reports phase Succeeded. The figure is the ratio of the two
wall times (machines here are shared and noisy; absolute seconds are printed but not compared).

    .venv/bin/python bench/bench_operator_scale.py --jobs 50
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_api import coordinates
from kubetune_localenv import scale, stack
from kubetune_localenv.cluster import LocalEnv
from kubetune_operator import builders

MAX_JOBS = 500
TIMEOUT = 300.0
COMMAND = "python bench/bench_operator_scale.py"


def finetunejob(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": coordinates.API_VERSION,
        "kind": coordinates.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "s3://models/llama-3.2-1b"},
            "dataset": {"train": "s3://datasets/chat/train.jsonl", "format": "chat"},
            "output": {"uri": f"s3://adapters/{name}"},
            "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
        },
    }


def _wait(what: str, done: Callable[[], int], total: int) -> float:
    started = time.monotonic()
    reported = -1
    while time.monotonic() - started < TIMEOUT:
        count = done()
        if count != reported:
            print(f"  {what}: {count}/{total} done after {time.monotonic() - started:.1f}s", flush=True)
            reported = count
        if count >= total:
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"{what}: {reported}/{total} done after {TIMEOUT:.0f}s")


def run_baseline(api: Any, namespace: str, count: int) -> float:
    """Create the operator's children (ConfigMap, RBAC, Job) directly; time until all Jobs succeeded."""
    from kubernetes import client, utils

    batch = client.BatchV1Api(api)
    started = time.monotonic()
    for i in range(count):
        ftj = finetunejob(f"ft-{i}", namespace)
        ftj["metadata"]["uid"] = str(uuid.uuid4())
        for child in builders.children(ftj, "ghcr.io/kubetune/trainer:0.1.0"):
            obj = copy.deepcopy(child)
            obj["metadata"].pop("ownerReferences", None)  # no FineTuneJob owns them here
            utils.create_from_dict(api, obj, namespace=namespace)

    def succeeded() -> int:
        jobs = batch.list_namespaced_job(namespace).items
        return sum(1 for j in jobs if (j.status.succeeded or 0) >= 1)

    _wait("baseline Jobs", succeeded, count)
    return time.monotonic() - started


def run_operator(api: Any, namespace: str, count: int) -> float:
    """Create FineTuneJobs; time until the operator reports all Succeeded."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    group, version, plural = coordinates.GROUP, coordinates.VERSION, coordinates.PLURAL
    started = time.monotonic()
    for i in range(count):
        custom.create_namespaced_custom_object(
            group, version, namespace, plural, finetunejob(f"ft-{i}", namespace)
        )

    def succeeded() -> int:
        items = custom.list_namespaced_custom_object(group, version, namespace, plural)["items"]
        return sum(1 for f in items if f.get("status", {}).get("phase") == "Succeeded")

    _wait("FineTuneJobs", succeeded, count)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50, help=f"FineTuneJobs per run (max {MAX_JOBS})")
    parser.add_argument("--nodes", type=int, default=4, help="kwok fake GPU nodes")
    args = parser.parse_args(argv)
    count = min(args.jobs, MAX_JOBS)

    from kubernetes import config

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        env = LocalEnv(Path(tmp), with_s3=False)
        env.extra_start += [scale.start_scheduler, scale.start_kwok]
        env.start()
        try:
            scale.add_fake_nodes(env, args.nodes)
            stack.install_crd(env)
            for ns in ("baseline", "operator"):
                stack.ensure_namespace(env, ns)
            api = config.new_client_from_config(str(env.kubeconfig))
            baseline = run_baseline(api, "baseline", count)
            stack.start_operator(env, ["operator"])
            operator = run_operator(api, "operator", count)
        finally:
            env.stop()

    print(f"jobs: {count} on {args.nodes} kwok nodes")
    print(f"baseline (Jobs created directly, until all succeeded): {baseline:.1f}s")
    print(f"operator (FineTuneJobs, until all status.phase=Succeeded): {operator:.1f}s")
    print(f"operator / baseline wall-time ratio: {operator / baseline:.2f}")
    print(f"reproduce: {COMMAND} --jobs {count} --nodes {args.nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
