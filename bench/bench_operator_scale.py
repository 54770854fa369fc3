"""Operator overhead at scale: N FineTuneJobs through the operator vs. the same N Jobs made directly.

One local control plane (etcd, kube-apiserver with an audit log, kube-controller-manager,
kube-scheduler) and kwok fake GPU nodes, which mark pods Running and complete Job pods without
running anything. Two phases in the same run, one after the other:

- baseline: a plain client creates, for each of N jobs, the children the operator would create
  (same builders, same pod template: ConfigMap, ServiceAccount, Role, RoleBinding, Job), and the
  Job controller runs them; a job is done when its Job has the Complete condition.
- operator: the operator runs as its own process (``python -m kubetune_operator``, serving one
  namespace); the client creates N FineTuneJobs; a job is done when it reports phase Succeeded.

``--mode burst`` applies all N at once (``--workers`` concurrent requests); ``--mode steady``
applies them at ``--rate`` per second. Watches on Jobs, Pods and FineTuneJobs time every event
as it arrives (the API server's own timestamps have one-second precision), so per job:
apply -> Job created latency, pod completed -> done lag. The operator's memory and CPU come from
/proc/<pid>/status (VmHWM: its peak resident set) and /proc/<pid>/stat. API requests come from the
API server: its audit log names each request's client by user agent (``kopf/...`` for kopf's
watches and patches, ``kubetune-operator`` for the operator's own client), its /metrics count
every client together. Every wait is bounded by ``--timeout``.

    .venv/bin/python bench/bench_operator_scale.py --mode burst --jobs 100
    .venv/bin/python bench/bench_operator_scale.py --mode steady --rate 10 --jobs 1000
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api import coordinates
from kubetune_localenv import scale, stack
from kubetune_localenv.cluster import LocalEnv, ManagedProcess
from kubetune_operator import builders, names
from kubetune_operator.kube import FINETUNEJOBS, JOBS, PODS, Kube

MAX_JOBS = 1000
COMMAND = ".venv/bin/python bench/bench_operator_scale.py"
TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
#: The benchmark's own client, as the audit log names it.
BENCH_AGENT = "kubetune-bench"
#: The operator's two clients: kopf (watches, its annotations, Events) and the reconciler's.
OPERATOR_AGENTS = ("kopf", names.OPERATOR_USER_AGENT)
#: After the last job is done, requests are counted until the operator has made none for this long
#: (it may still be working through its backlog of events), or for at most ``SETTLE_LIMIT`` seconds.
QUIET_SECONDS = 3.0
SETTLE_LIMIT = 120.0
MB = 1_000_000
Obj = dict[str, Any]
Counts = Counter[tuple[str, str]]


def finetunejob(name: str, namespace: str) -> Obj:
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


@dataclass
class Timeline:
    """When each job (by FineTuneJob name) was applied, got its Job, had its pod complete, was done."""

    expected: frozenset[str]
    applied: dict[str, float] = field(default_factory=dict)
    job_created: dict[str, float] = field(default_factory=dict)
    pod_done: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    all_done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, which: dict[str, float], name: str | None, at: float) -> None:
        if name not in self.expected:
            return
        with self.lock:
            which.setdefault(name, at)
            if len(self.done) >= len(self.expected):
                self.all_done.set()

    def progress(self) -> str:
        n = len(self.expected)
        return (
            f"applied {len(self.applied)}/{n}, Jobs {len(self.job_created)}/{n}, "
            f"pods completed {len(self.pod_done)}/{n}, done {len(self.done)}/{n}"
        )


def _job_of(obj: Mapping[str, Any]) -> str | None:
    label: str | None = (obj.get("metadata", {}).get("labels") or {}).get(names.LABEL_FINETUNEJOB)
    return label


def _complete(job: Mapping[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def follow(kube: Kube, namespace: str, timeline: Timeline, *, operator: bool) -> None:
    """Watch Jobs and Pods (and, for the operator, FineTuneJobs) and mark the timeline."""

    def on_job(_kind: str, job: Obj, at: float) -> None:
        timeline.mark(timeline.job_created, _job_of(job), at)
        if not operator and _complete(job):
            timeline.mark(timeline.done, _job_of(job), at)

    def on_pod(_kind: str, pod: Obj, at: float) -> None:
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            timeline.mark(timeline.pod_done, _job_of(pod), at)

    def on_ftj(_kind: str, ftj: Obj, at: float) -> None:
        if (ftj.get("status") or {}).get("phase") == "Succeeded":
            timeline.mark(timeline.done, ftj["metadata"]["name"], at)

    selector = names.LABEL_FINETUNEJOB
    scale.Follow(kube, JOBS.path(namespace), on_job, selector).start()
    scale.Follow(kube, PODS.path(namespace), on_pod, selector, fields="status.phase=Succeeded").start()
    if operator:
        scale.Follow(kube, FINETUNEJOBS.path(namespace), on_ftj).start()


def apply_all(
    job_names: list[str], create: Callable[[str], None], args: argparse.Namespace, timeline: Timeline
) -> None:
    """``create`` each job: all at once (``--workers`` at a time) or at ``--rate`` per second."""

    def one(name: str) -> None:
        timeline.applied[name] = time.monotonic()
        create(name)

    with ThreadPoolExecutor(args.workers, thread_name_prefix="apply") as pool:
        if args.mode == "burst":
            list(pool.map(one, job_names))
            return
        futures = []
        start = time.monotonic()
        for i, name in enumerate(job_names):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, name))
        for future in futures:
            future.result()


def baseline_creator(kube: Kube, namespace: str) -> Callable[[str], None]:
    """Create the operator's children for one job directly (no FineTuneJob owns them)."""

    def create(name: str) -> None:
        ftj = finetunejob(name, namespace)
        ftj["metadata"]["uid"] = str(uuid.uuid4())
        for child in builders.children(ftj, TRAINER_IMAGE):
            obj = copy.deepcopy(child)
            obj["metadata"].pop("ownerReferences", None)
            kube.create(obj)

    return create


def operator_creator(kube: Kube, namespace: str) -> Callable[[str], None]:
    def create(name: str) -> None:
        kube.create(finetunejob(name, namespace))

    return create


@dataclass
class PhaseResult:
    """One phase's timeline, the API requests made meanwhile, and the operator's usage."""

    label: str
    timeline: Timeline
    wall_seconds: float
    busy_seconds: float
    by_agent: dict[str, Counts]
    all_clients: Counts
    usage_before: scale.ProcessUsage | None = None
    usage_after: scale.ProcessUsage | None = None
    syncs: Counts = field(default_factory=Counter)


def operator_syncs(proc: ManagedProcess) -> Counts:
    """The operator's own counters: (reconcile | reconcile_skipped, trigger) -> count."""
    assert proc.env is not None
    url = f"http://127.0.0.1:{proc.env['KUBETUNE_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: Counts = Counter()
    for line in text.splitlines():
        for metric in ("kubetune_reconcile_total", "kubetune_reconcile_skipped_total"):
            if line.startswith(metric + "{"):
                trigger = line.split('trigger="', 1)[1].split('"', 1)[0]
                counts[(metric.removeprefix("kubetune_").removesuffix("_total"), trigger)] += int(
                    float(line.rsplit(" ", 1)[1])
                )
    return counts


@dataclass
class Bench:
    """What the phases share: the environment, the client, the options, the audit log."""

    env: LocalEnv
    kube: Kube
    args: argparse.Namespace
    audit_log: Path

    def run_phase(
        self,
        label: str,
        namespace: str,
        create: Callable[[str], None],
        operator: ManagedProcess | None = None,
    ) -> PhaseResult:
        job_names = [f"ft-{i}" for i in range(self.args.jobs)]
        timeline = Timeline(frozenset(job_names))
        follow(self.kube, namespace, timeline, operator=operator is not None)
        totals = scale.request_totals(self.env)
        offset = scale.audit_offset(self.audit_log)
        usage = scale.process_usage(operator.pid) if operator and operator.pid else None
        syncs = operator_syncs(operator) if operator else Counter()
        print(f"{label}: applying {len(job_names)} ({self.args.mode})", flush=True)
        started = time.monotonic()
        apply_all(job_names, create, self.args, timeline)
        while not timeline.all_done.wait(10):
            print(f"  {label} after {time.monotonic() - started:.0f}s: {timeline.progress()}", flush=True)
            if time.monotonic() - started > self.args.timeout:
                raise TimeoutError(f"{label}: not done after {self.args.timeout:.0f}s: {timeline.progress()}")
        wall = max(timeline.done.values()) - started
        print(f"  {label} done after {wall:.1f}s: {timeline.progress()}", flush=True)
        busy = self.settle(offset) - started
        by_agent = scale.audit_counts(self.audit_log, offset, scale.audit_offset(self.audit_log))
        result = PhaseResult(label, timeline, wall, busy, by_agent, scale.request_totals(self.env) - totals)
        if operator is not None and operator.pid is not None:
            result.usage_before, result.usage_after = usage, scale.process_usage(operator.pid)
            result.syncs = operator_syncs(operator) - syncs
        return result

    def settle(self, offset: int) -> float:
        """Wait until the operator has made no request for ``QUIET_SECONDS``; when its last one was."""
        last = time.monotonic()
        deadline = last + SETTLE_LIMIT
        while time.monotonic() - last < QUIET_SECONDS and time.monotonic() < deadline:
            time.sleep(0.5)
            end = scale.audit_offset(self.audit_log)
            counts = scale.audit_counts(self.audit_log, offset, end)
            offset = end
            if any(sum(counts.get(agent, Counter()).values()) for agent in OPERATOR_AGENTS):
                last = time.monotonic()
        return last

    def warm_up(self, namespace: str) -> None:
        """One FineTuneJob through the operator before the clock starts (its watches are up)."""
        self.kube.create(finetunejob("warmup", namespace))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ftj = self.kube.get(FINETUNEJOBS, namespace, "warmup") or {}
            if (ftj.get("status") or {}).get("phase") == "Succeeded":
                return
            time.sleep(0.5)
        raise TimeoutError(f"the warm-up FineTuneJob did not succeed in 120s; see {self.env.logs_dir}")


# -- figures ---------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _lags(later: Mapping[str, float], earlier: Mapping[str, float]) -> list[float]:
    return [later[n] - earlier[n] for n in later if n in earlier]


def figures(result: PhaseResult) -> dict[str, float]:
    """The timing figures of one phase, by name."""
    t = result.timeline
    latency = _lags(t.job_created, t.applied)
    settle = _lags(t.done, t.pod_done)
    first = min(t.applied.values())
    n = len(t.expected)
    return {
        "apply rate achieved (/s)": n / max(max(t.applied.values()) - first, 1e-9),
        "apply -> Job created p50 (s)": percentile(latency, 50),
        "apply -> Job created p99 (s)": percentile(latency, 99),
        "apply -> Job created max (s)": max(latency),
        "Jobs created per second": n / (max(t.job_created.values()) - first),
        "pod completed -> done p50 (s)": percentile(settle, 50),
        "pod completed -> done p99 (s)": percentile(settle, 99),
        "last pod completed -> all done (s)": max(t.done.values()) - max(t.pod_done.values()),
        "first apply -> all done (s)": result.wall_seconds,
        "first apply -> operator quiet (s)": result.busy_seconds,
    }


def split(counts: Counts) -> tuple[Counter[str], Counter[str]]:
    """(reads by verb, writes by verb)."""
    reads: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    for (verb, _resource), count in counts.items():
        if verb in scale.READ_VERBS:
            reads[verb] += count
        elif verb in scale.WRITE_VERBS:
            writes[verb] += count
    return reads, writes


def of_agents(result: PhaseResult, agents: Iterable[str]) -> Counts:
    total: Counts = Counter()
    for agent in agents:
        total.update(result.by_agent.get(agent, Counter()))
    return total


def per_job(counter: Mapping[Any, int], n: int) -> str:
    return ", ".join(f"{key} {count / n:.2f}" for key, count in sorted(counter.items())) or "none"


def print_timings(baseline: PhaseResult, operator: PhaseResult) -> dict[str, float]:
    ours = figures(operator)
    theirs = figures(baseline)
    print(f"{'':40} {'baseline':>10} {'operator':>10}")
    for key, value in ours.items():
        print(f"{key:40} {theirs[key]:>10.3f} {value:>10.3f}")
    return ours


def print_usage(operator: PhaseResult) -> scale.ProcessUsage:
    before, after = operator.usage_before, operator.usage_after
    assert before is not None
    assert after is not None
    n = len(operator.timeline.expected)
    cpu = after.cpu_seconds - before.cpu_seconds
    print(
        f"operator RSS: {before.rss_bytes / MB:.1f} MB before the first apply, peak (VmHWM) "
        f"{after.peak_rss_bytes / MB:.1f} MB, {after.rss_bytes / MB:.1f} MB at the end with {n} jobs held"
    )
    print(f"operator CPU: {cpu:.1f} s during the phase ({cpu / n * 1000:.1f} ms per job)")
    for kind in ("reconcile", "reconcile_skipped"):
        by_trigger = {t: c for (k, t), c in operator.syncs.items() if k == kind}
        total = sum(by_trigger.values()) / n
        print(f"operator {kind.replace('_', ' ')}s per job: {total:.2f} ({per_job(by_trigger, n)})")
    return after


def print_requests(baseline: PhaseResult, operator: PhaseResult) -> float:
    """The API requests per job; returns the operator's writes per job."""
    n = len(operator.timeline.expected)
    ours = of_agents(operator, OPERATOR_AGENTS)
    reads, writes = split(ours)
    print(f"operator API requests per job (audit log, user agents {', '.join(OPERATOR_AGENTS)}):")
    print(f"  reads {sum(reads.values()) / n:.2f} ({per_job(reads, n)})")
    print(f"  writes {sum(writes.values()) / n:.2f} ({per_job(writes, n)})")
    write_keys = {k: v for k, v in ours.items() if k[0] in scale.WRITE_VERBS}
    read_keys = {k: v for k, v in ours.items() if k[0] in scale.READ_VERBS}
    print(f"  writes by resource: {per_job({f'{v} {r}': c for (v, r), c in write_keys.items()}, n)}")
    print(f"  reads by resource: {per_job({f'{v} {r}': c for (v, r), c in read_keys.items()}, n)}")
    for agent in OPERATOR_AGENTS:
        agent_reads, agent_writes = split(operator.by_agent.get(agent, Counter()))
        r, w = sum(agent_reads.values()) / n, sum(agent_writes.values()) / n
        print(f"  of which {agent}: reads {r:.2f}, writes {w:.2f}")
    _reads, bench_writes = split(of_agents(baseline, [BENCH_AGENT]))
    print(
        f"baseline client writes per job: {sum(bench_writes.values()) / n:.2f} ({per_job(bench_writes, n)})"
    )
    for result in (baseline, operator):
        all_reads, all_writes = split(result.all_clients)
        print(
            f"{result.label} phase, every client (apiserver_request_total): "
            f"reads {sum(all_reads.values()) / n:.2f}, writes {sum(all_writes.values()) / n:.2f} per job"
        )
    return sum(writes.values()) / n


def print_goals(
    args: argparse.Namespace, timings: Mapping[str, float], peak_rss: float, writes: float
) -> None:
    def line(goal: str, value: str, met: bool, note: str = "") -> None:
        print(f"  {goal}: {value}: {'met' if met else 'NOT met'}{note}")

    print("goals:")
    if args.mode == "steady":
        p99 = timings["apply -> Job created p99 (s)"]
        line(f"apply -> Job created p99 < 1 s at {args.rate:g}/s", f"{p99:.3f} s", p99 < 1.0)
    else:
        rate = timings["Jobs created per second"]
        line(">= 50 Jobs created per second in a burst", f"{rate:.1f}/s", rate >= 50)
    note = "" if args.jobs >= MAX_JOBS else f" (measured with {args.jobs} jobs; the goal is at {MAX_JOBS})"
    line("operator peak RSS < 150 MB with 1,000 jobs", f"{peak_rss / MB:.1f} MB", peak_rss < 150 * MB, note)
    line("<= 10 API writes per job lifecycle", f"{writes:.2f}", writes <= 10)


def reproduce(args: argparse.Namespace) -> str:
    rate = f" --rate {args.rate:g}" if args.mode == "steady" else ""
    stock = " --stock-qps" if args.stock_qps else ""
    return (
        f"{COMMAND} --mode {args.mode}{rate} --jobs {args.jobs} --nodes {args.nodes} "
        f"--workers {args.workers} --timeout {args.timeout:g}{stock}"
    )


def run(args: argparse.Namespace, tmp: Path) -> tuple[PhaseResult, PhaseResult]:
    env = LocalEnv(tmp / "env", with_s3=False)
    audit_log = scale.enable_audit_log(env, tmp / "audit")
    scheduler_args: tuple[str, ...] = ()
    if not args.stock_qps:
        scale.unthrottle(env)
        scheduler_args = scale.UNTHROTTLED
    env.extra_start += [functools.partial(scale.start_scheduler, extra_args=scheduler_args), scale.start_kwok]
    env.start()
    try:
        scale.add_fake_nodes(env, args.nodes)
        stack.install_crd(env)
        for ns in ("baseline", "operator"):
            stack.ensure_namespace(env, ns)
        bench = Bench(env, Kube.connect(env.kubeconfig, user_agent=BENCH_AGENT), args, audit_log)
        baseline = bench.run_phase("baseline", "baseline", baseline_creator(bench.kube, "baseline"))
        proc = stack.start_operator(env, ["operator"])
        bench.warm_up("operator")
        operator = bench.run_phase("operator", "operator", operator_creator(bench.kube, "operator"), proc)
        if not proc.alive():
            raise RuntimeError(f"the operator exited during the run; log {proc.log_path}")
        return baseline, operator
    finally:
        env.stop()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("burst", "steady"), default="burst")
    parser.add_argument(
        "--rate", type=float, default=10.0, help="steady mode: FineTuneJobs applied per second"
    )
    parser.add_argument("--jobs", type=int, default=100, help=f"FineTuneJobs per phase (1..{MAX_JOBS})")
    parser.add_argument("--nodes", type=int, default=4, help="kwok fake GPU nodes (1,000 GPUs each)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent create requests")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each phase may take")
    parser.add_argument("--state", type=Path, help="keep the state, logs and audit log in this (new) folder")
    parser.add_argument(
        "--stock-qps",
        action="store_true",
        help="keep kube-controller-manager's and kube-scheduler's default client rate limits (20 and 50/s)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= MAX_JOBS or args.rate <= 0:
        parser.error(f"--jobs must be 1..{MAX_JOBS} and --rate positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    load_before = os.getloadavg()[0]
    if args.state is not None:
        baseline, operator = run(args, args.state)
    else:
        with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
            baseline, operator = run(args, Path(tmp))
    how = f"at {args.rate:g}/s" if args.mode == "steady" else f"{args.workers} concurrent creates"
    print(f"\njobs: {args.jobs} on {args.nodes} kwok nodes, mode {args.mode}, {how}")
    load_after = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before:.1f} then {load_after:.1f} at the end")
    timings = print_timings(baseline, operator)
    usage = print_usage(operator)
    writes = print_requests(baseline, operator)
    print_goals(args, timings, usage.peak_rss_bytes, writes)
    print(f"reproduce: {reproduce(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
