"""The operator SIGKILLed at random moments across many FineTuneJob lifecycles (issue 16, fault 1).

The operator runs as its own process (``python -m kubetune_operator``, as in its Deployment) and is
killed with SIGKILL at moments drawn from a seeded schedule: while it creates children, patches
status or aligns a Job, while it resumes after a restart, or while it starts up. Meanwhile the
test plays the kubelet (pod status written through the API, as ``tests/operator`` does: there is
no node) and the users (create, suspend, resume, delete), also while no operator runs. The real
Job controller, TTL-after-finished controller and garbage collector act throughout.

After each restart that lives long enough the test stops acting, and every FineTuneJob's status
must converge to what its Job and pods show (phase, conditions, observedGeneration). At the end:
every FineTuneJob in its expected terminal phase (or gone together with its children), each
FineTuneJob's Job created at most once (every Job uid seen by one gap-free watch that spans the
test), and nothing left with a deletionTimestamp.

Bounded: ``KUBETUNE_FAULT_JOBS`` FineTuneJobs (default 30), at least ``KUBETUNE_FAULT_KILLS``
kills (default 8), a wall-clock budget, 127.0.0.1 only. ``KUBETUNE_FAULT_SEED`` replays a
schedule (the seed is printed; timing still differs between runs). The figures in
docs/reliability.md come from::

    KUBETUNE_FAULT_JOBS=100 KUBETUNE_FAULT_KILLS=30 \\
        .venv/bin/pytest tests/faults/test_operator_kill.py -s -p no:cacheprovider
"""

from __future__ import annotations

import enum
import os
import random
import signal
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import coordinates
from kubetune_api.exitcodes import ExitCode
from kubetune_api.reasons import ConditionType
from kubetune_localenv import stack
from kubetune_localenv.cluster import LocalEnv, ManagedProcess, pick_port
from kubetune_operator import names
from kubetune_operator.kube import (
    CONFIGMAPS,
    FINETUNEJOBS,
    JOBS,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    Kube,
    KubeError,
    Resource,
)

Obj = dict[str, Any]

JOBS_COUNT = int(os.environ.get("KUBETUNE_FAULT_JOBS") or 30)
MIN_KILLS = int(os.environ.get("KUBETUNE_FAULT_KILLS") or 8)
#: The whole run (creations, kills, restarts) must end within this; then the final checks.
BUDGET_S = float(os.environ.get("KUBETUNE_FAULT_BUDGET") or 90 + 3 * JOBS_COUNT + 6 * MIN_KILLS)
#: How long one restarted operator may take to make every status true again.
CONVERGE_S = 60.0
TICK_S = 0.2
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"
CHILDREN = (JOBS, PODS, CONFIGMAPS, SERVICEACCOUNTS, ROLES, ROLEBINDINGS)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(int(BUDGET_S + 4 * CONVERGE_S + 120))]


class Outcome(enum.StrEnum):
    SUCCEED = "succeed"
    FAIL = "fail"  # the trainer's non-retryable exit code: the Job fails at once
    RETRY = "retry"  # exit 1, then the Job's second pod succeeds
    SUSPEND = "suspend"  # suspended while running, resumed, then succeeds
    DELETE = "delete"  # the FineTuneJob deleted mid-run
    TTL = "ttl"  # succeeds; ttlSecondsAfterFinished deletes the Job right after


#: What the test does for each outcome, one step at a time (each after a random delay).
STEPS: Mapping[Outcome, tuple[str, ...]] = {
    Outcome.SUCCEED: ("run", "exit:0"),
    Outcome.FAIL: ("run", f"exit:{int(ExitCode.INVALID_DATA)}"),
    Outcome.RETRY: ("run", "exit:1", "run", "exit:0"),
    Outcome.SUSPEND: ("run", "suspend", "suspended", "resume", "run", "exit:0"),
    Outcome.DELETE: ("run", "delete"),
    Outcome.TTL: ("run", "exit:0"),
}
TERMINAL: Mapping[Outcome, tuple[str, str] | None] = {
    Outcome.SUCCEED: ("Succeeded", "Completed"),
    Outcome.FAIL: ("Failed", "InvalidDataset"),
    Outcome.RETRY: ("Succeeded", "Completed"),
    Outcome.SUSPEND: ("Succeeded", "Completed"),
    Outcome.DELETE: None,
    Outcome.TTL: ("Succeeded", "Completed"),
}
#: Every condition type the operator reports (from the contract: a new one is expected here too).
CONDITION_TYPES = {str(t) for t in ConditionType}
#: The condition that is True in each phase (Created aside).
TRUE_IN_PHASE = {"Pending": set(), "Running": {"Running"}, "Suspended": {"Suspended"},
                 "Succeeded": {"Succeeded"}, "Failed": {"Failed"}, "Cancelled": {"Cancelled"}}  # fmt: skip


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cond(obj: Mapping[str, Any], kind: str) -> bool:
    conditions = obj.get("status", {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def _pod_phase(pod: Mapping[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase") or "Pending")


# --- the operator as a process ------------------------------------------------------------------


class OperatorProcess:
    """``python -m kubetune_operator`` started, SIGKILLed and started again; one log per start."""

    def __init__(
        self, env: LocalEnv, namespace: str, logs: Path, tag: str = "operator", **extra_env: str
    ) -> None:
        self.env = env
        self.namespace = namespace
        self.logs = logs
        self.tag = tag
        self.extra_env = extra_env
        self.starts = 0
        self.proc: ManagedProcess | None = None
        self.health_port = 0

    def spawn(self) -> None:
        assert self.proc is None or not self.proc.alive()
        self.starts += 1
        self.health_port = pick_port()
        proc_env = {
            **os.environ,
            "KUBECONFIG": str(self.env.kubeconfig),
            "KUBETUNE_NAMESPACES": self.namespace,
            "KUBETUNE_TRAINER_IMAGE": TRAINER_IMAGE,
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_BIND_ADDRESS": "127.0.0.1",
            "KUBETUNE_PEERING": "",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        argv = [sys.executable, "-m", "kubetune_operator"]
        log = self.logs / f"{self.tag}-{self.starts}.log"
        self.proc = ManagedProcess(self.tag, argv, log, proc_env)
        self.proc.start()

    def healthy(self) -> bool:
        assert self.proc is not None
        if not self.proc.alive():
            raise AssertionError(f"the operator exited by itself; log:\n{self.proc.log_tail()}")
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no graceful withdrawal, requests cut mid-flight."""
        assert self.proc is not None
        assert self.proc.popen is not None
        if self.proc.alive():
            self.proc.popen.send_signal(signal.SIGKILL)
        self.proc.popen.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc else "(never started)"

    def output(self) -> str:
        """The log of the current (last) start."""
        return self.proc.log_path.read_text(errors="replace") if self.proc else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob(f"{self.tag}-*.log")))


# --- every Job uid, from one gap-free watch ------------------------------------------------------


class Watch(threading.Thread):
    """One gap-free watch of a resource in the namespace, from before the test's first object."""

    def __init__(self, kube: Kube, namespace: str, resource: Resource) -> None:
        super().__init__(name=f"watch-{resource.plural}", daemon=True)
        self.kube = kube
        self.path = resource.path(namespace)
        self.errors: list[str] = []
        self.stopping = threading.Event()
        listing = kube.request("GET", self.path)
        for obj in listing.get("items", []):
            self.record(obj)
        self.resource_version = str(listing["metadata"]["resourceVersion"])

    def record(self, obj: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def run(self) -> None:
        params = {"resourceVersion": self.resource_version, "allowWatchBookmarks": "true"}
        try:
            while not self.stopping.is_set():
                for event in self.kube.watch(self.path, params, timeout_seconds=5):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":  # e.g. 410 Gone: the record would have a gap
                        self.errors.append(str(obj.get("message") or obj))
                        return
                    params["resourceVersion"] = obj["metadata"]["resourceVersion"]
                    if event.get("type") not in ("BOOKMARK", "DELETED"):
                        self.record(obj)
        except Exception as err:  # any other end of the watch also leaves a gap
            self.errors.append(repr(err))

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.errors, f"the watch of {self.path} had a gap, so it cannot vouch: {self.errors}"


class JobWatch(Watch):
    """Every Job ever created, by FineTuneJob: a Job created twice shows as a second uid."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.uids: defaultdict[str, set[str]] = defaultdict(set)
        super().__init__(kube, namespace, JOBS)

    def record(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.uids[(meta.get("labels") or {}).get(names.LABEL_FINETUNEJOB, "")].add(meta["uid"])


class StatusWatch(Watch):
    """Every status phase each FineTuneJob showed, in order (writes that undo each other show)."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.phases: defaultdict[str, list[tuple[str, int]]] = defaultdict(list)
        self.writes = 0
        super().__init__(kube, namespace, FINETUNEJOBS)

    def record(self, obj: Mapping[str, Any]) -> None:
        status = obj.get("status") or {}
        seen = (str(status.get("phase") or ""), int(status.get("observedGeneration") or 0))
        history = self.phases[obj["metadata"]["name"]]
        if not history or history[-1] != seen:
            history.append(seen)
            self.writes += 1

    def regressions(self) -> list[str]:
        """A terminal phase that changed again, or an observedGeneration that went back."""
        out = []
        for name, history in self.phases.items():
            terminal = [i for i, (phase, _) in enumerate(history) if phase in ("Succeeded", "Failed")]
            if terminal and any(phase != history[terminal[0]][0] for phase, _ in history[terminal[0] :]):
                out.append(f"{name}: {[phase for phase, _ in history]}")
            generations = [generation for _, generation in history if generation]
            if generations != sorted(generations):
                out.append(f"{name}: observedGeneration {generations}")
        return out


# --- what the users and the kubelet do -----------------------------------------------------------


@dataclass
class Plan:
    """One FineTuneJob's life as the test drives it."""

    name: str
    outcome: Outcome
    create_at: float  # on the driver's clock
    delays: list[float]  # before each step
    steps: tuple[str, ...]
    ttl: int | None = None
    uid: str = ""
    step: int = 0
    ready_at: float = 0.0
    ran: list[str] = field(default_factory=list)  # pod names this test started
    done: bool = False

    @property
    def created(self) -> bool:
        return bool(self.uid)

    @property
    def deleted(self) -> bool:
        return "delete" in self.steps[: self.step]


@dataclass
class World:
    """One snapshot of the namespace: FineTuneJobs, Jobs and Pods by FineTuneJob name."""

    ftjs: dict[str, Obj]
    jobs: dict[str, Obj]
    pods: dict[str, list[Obj]]

    @classmethod
    def read(cls, kube: Kube, namespace: str) -> World:
        ftjs = {f["metadata"]["name"]: f for f in kube.list(FINETUNEJOBS, namespace)}
        jobs: dict[str, Obj] = {}
        for job in kube.list(JOBS, namespace):
            jobs[(job["metadata"].get("labels") or {}).get(names.LABEL_FINETUNEJOB, "")] = job
        pods: defaultdict[str, list[Obj]] = defaultdict(list)
        for pod in kube.list(PODS, namespace):
            pods[(pod["metadata"].get("labels") or {}).get(names.LABEL_FINETUNEJOB, "")].append(pod)
        for items in pods.values():
            items.sort(key=lambda p: p["metadata"]["creationTimestamp"])
        return cls(ftjs, jobs, dict(pods))

    def job_of(self, plan: Plan) -> Obj | None:
        job = self.jobs.get(plan.name)
        if job is None:
            return None
        owners = job["metadata"].get("ownerReferences") or []
        return job if any(o.get("uid") == plan.uid for o in owners) else None


class Driver:
    """Plays users and kubelet: acts on the plans whose next step is due, one tick at a time."""

    def __init__(self, kube: Kube, namespace: str, plans: list[Plan]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.plans = plans
        self.clock = 0.0  # advances only while the driver acts
        self.actions = Counter[str]()
        self.actions_while_down = 0

    def run_for(self, seconds: float, operator_alive: bool = True, then_until_action: bool = False) -> None:
        """Act for ``seconds``; with ``then_until_action``, go on until a tick acts and return at once
        (so that a kill right after lands while the operator reacts to that change)."""
        end = time.monotonic() + seconds
        give_up = end + 10.0  # every story may be waiting for the operator
        while True:
            started = time.monotonic()
            acted = self.tick(operator_alive)
            now = time.monotonic()
            if then_until_action and now >= end and (acted or now >= give_up):
                self.clock += now - started
                return
            if not then_until_action:
                time.sleep(max(0.0, min(TICK_S, end - now)))
            else:
                time.sleep(TICK_S)
            self.clock += time.monotonic() - started
            if not then_until_action and time.monotonic() >= end:
                return

    def all_done(self) -> bool:
        return all(p.done for p in self.plans)

    def tick(self, operator_alive: bool) -> int:
        """One round of due steps on one snapshot; how many were taken."""
        world = World.read(self.kube, self.namespace)
        count = 0
        for plan in self.plans:
            acted = self._advance(plan, world)
            if acted:
                count += 1
                self.actions[acted] += 1
                if not operator_alive:
                    self.actions_while_down += 1
        return count

    def _advance(self, plan: Plan, world: World) -> str | None:
        if plan.done:
            return None
        if not plan.created:
            if self.clock < plan.create_at:
                return None
            plan.uid = self.create(plan)
            plan.ready_at = self.clock + plan.delays[0]
            return "create"
        if self.clock < plan.ready_at:
            return None
        step = plan.steps[plan.step]
        if not self._do(step, plan, world):
            return None
        plan.step += 1
        if plan.step == len(plan.steps):
            plan.done = True
        else:
            plan.ready_at = self.clock + plan.delays[plan.step]
        return step.split(":")[0]

    def create(self, plan: Plan) -> str:
        spec: Obj = {
            "model": {"source": "s3://models/tiny-llama"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": f"s3://results/{plan.name}"},
            "resources": {"gpus": 0},
        }
        if plan.ttl is not None:
            spec["lifecycle"] = {"ttlSecondsAfterFinished": plan.ttl}
        body = {
            "apiVersion": coordinates.API_VERSION,
            "kind": coordinates.KIND,
            "metadata": {"name": plan.name, "namespace": self.namespace},
            "spec": spec,
        }
        return str(self.kube.create(body)["metadata"]["uid"])

    def act(self, step: str, plan: Plan) -> bool:
        """One step now, on a fresh snapshot; whether it could be done."""
        return self._do(step, plan, World.read(self.kube, self.namespace))

    def _do(self, step: str, plan: Plan, world: World) -> bool:
        pods = world.pods.get(plan.name, [])
        if step == "run":
            fresh = [
                p
                for p in pods
                if _pod_phase(p) == "Pending" and not _deleting(p) and p["metadata"]["name"] not in plan.ran
            ]
            if not fresh:
                return False
            pod = fresh[-1]
            state = {"running": {"startedAt": _now()}}
            if not self._pod_status(pod, "Running", state, ready=True):
                return False
            plan.ran.append(pod["metadata"]["name"])
            return True
        if step.startswith("exit:"):
            code = int(step.split(":")[1])
            mine = [p for p in pods if p["metadata"]["name"] == plan.ran[-1] and _pod_phase(p) == "Running"]
            if not mine:
                return False
            now = _now()
            terminated: Obj = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                               "startedAt": now, "finishedAt": now}  # fmt: skip
            if code == ExitCode.INVALID_DATA:
                terminated["message"] = "line 3: 'messages' is missing"
            return self._pod_status(
                mine[0], "Succeeded" if code == 0 else "Failed", {"terminated": terminated}
            )
        if step in ("suspend", "resume"):
            self.kube.patch(FINETUNEJOBS, self.namespace, plan.name, {"spec": {"suspend": step == "suspend"}})
            return True
        if step == "suspended":  # the operator suspended the Job and its pod is gone
            job = world.job_of(plan)
            live = [p for p in pods if _pod_phase(p) in ("Pending", "Running")]
            return job is not None and bool(job["spec"].get("suspend")) and not live
        if step == "delete":
            self.kube.delete(FINETUNEJOBS, self.namespace, plan.name)
            return True
        raise AssertionError(f"unknown step {step}")

    def _pod_status(self, pod: Mapping[str, Any], phase: str, state: Obj, ready: bool = False) -> bool:
        container = {"name": names.TRAINER_CONTAINER, "image": pod["spec"]["containers"][0]["image"],
                     "imageID": "", "ready": ready, "restartCount": 0, "started": "running" in state,
                     "state": state}  # fmt: skip
        patch = {"status": {"phase": phase, "containerStatuses": [container]}}
        try:
            self.kube.patch(PODS, self.namespace, pod["metadata"]["name"], patch, "status")
        except KubeError as err:
            if err.status in (404, 409, 422):  # deleted meanwhile (a suspend): try again next tick
                return False
            raise
        return True


def make_plans(rng: random.Random, count: int) -> list[Plan]:
    outcomes = [list(Outcome)[i % len(Outcome)] for i in range(count)]
    rng.shuffle(outcomes)
    span = 1.0 * count  # creations spread over the first `count` seconds of the driver's clock
    plans = []
    for i, outcome in enumerate(outcomes):
        steps = STEPS[outcome]
        if outcome == Outcome.DELETE and rng.random() < 0.4:
            steps = ("delete",)  # deleted before its pod ever ran
        plans.append(
            Plan(
                name=f"k{i:03d}-{outcome.value}",
                outcome=outcome,
                create_at=rng.uniform(0, span),
                delays=[rng.uniform(0.2, 3.0) for _ in steps],
                steps=steps,
                ttl=rng.choice([0, 1, 2]) if outcome == Outcome.TTL else None,
            )
        )
    return plans


# --- what a converged status looks like ----------------------------------------------------------


def expected_phase(plan: Plan, world: World) -> tuple[str, str | None] | str:
    """(phase, reason or None) the status must show for this world, or why nothing can be right."""
    ftj = world.ftjs[plan.name]
    job = world.job_of(plan)
    if job is None:
        if plan.outcome == Outcome.TTL and plan.done:
            return ("Succeeded", "Completed")  # the TTL controller removed the finished Job
        return "no Job exists"
    if _cond(job, "Complete"):
        return ("Succeeded", "Completed")
    if _cond(job, "Failed"):
        return ("Failed", None)
    if ftj["spec"].get("suspend"):
        if not job["spec"].get("suspend"):
            return "the Job is not suspended"
        return ("Suspended", None)
    if job["spec"].get("suspend"):
        return "the Job is still suspended"
    pods = [p for p in world.pods.get(plan.name, []) if not _deleting(p)]
    if any(_pod_phase(p) in ("Running", "Succeeded") for p in pods):
        return ("Running", None)
    return ("Pending", None)


def status_problems(plan: Plan, world: World) -> list[str]:
    """What is wrong with one FineTuneJob's status; empty when it is converged."""
    ftj = world.ftjs.get(plan.name)
    if ftj is None:
        return [f"{plan.name}: FineTuneJob missing"]
    status = ftj.get("status") or {}
    generation = ftj["metadata"].get("generation")
    problems = []
    want = expected_phase(plan, world)
    if isinstance(want, str):
        return [f"{plan.name}: {want}"]
    phase, reason = want
    if status.get("phase") != phase or reason not in (None, status.get("reason")):
        problems.append(
            f"{plan.name}: {status.get('phase')}/{status.get('reason')}, expected {phase}/{reason}"
        )
    if status.get("observedGeneration") != generation:
        problems.append(f"{plan.name}: observedGeneration {status.get('observedGeneration')} != {generation}")
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    if set(conditions) != CONDITION_TYPES:
        problems.append(f"{plan.name}: conditions {sorted(conditions)}")
        return problems
    true = {t for t, c in conditions.items() if c["status"] == "True"} - {"Created"}
    if true != TRUE_IN_PHASE.get(phase, set()) or conditions["Created"]["status"] != "True":
        problems.append(f"{plan.name}: True conditions {sorted(true)} in phase {phase}")
    stale = [t for t, c in conditions.items() if c.get("observedGeneration") != generation]
    if stale:
        problems.append(f"{plan.name}: conditions {stale} not at generation {generation}")
    return problems


def convergence_problems(plans: list[Plan], world: World) -> list[str]:
    problems: list[str] = []
    for plan in plans:
        if plan.created and not plan.deleted:
            problems += status_problems(plan, world)
    return problems


def terminal_problems(plans: list[Plan], world: World) -> list[str]:
    """FineTuneJobs not (yet) in the phase their story ends in, or not gone after their deletion."""
    out = []
    for plan in plans:
        want = TERMINAL[plan.outcome]
        ftj = world.ftjs.get(plan.name)
        if want is None:
            if ftj is not None:
                out.append(f"{plan.name}: still there after its deletion")
            continue
        status = (ftj or {}).get("status") or {}
        if (status.get("phase"), status.get("reason")) != want:
            out.append(f"{plan.name}: {status.get('phase')}/{status.get('reason')}, expected {want}")
    return out


def leftovers(plans: list[Plan], kube: Kube, namespace: str) -> list[str]:
    """Objects stuck in deletion, children of deleted FineTuneJobs, Jobs their TTL should remove."""
    deleted = {p.name for p in plans if p.outcome == Outcome.DELETE}
    expired = {p.name for p in plans if p.outcome == Outcome.TTL}
    out = []
    for resource in (FINETUNEJOBS, *CHILDREN):
        for obj in kube.list(resource, namespace):
            meta = obj["metadata"]
            owner = (meta.get("labels") or {}).get(names.LABEL_FINETUNEJOB, "")
            if _deleting(obj):
                out.append(f"{resource.plural}/{meta['name']} stuck in deletion")
            elif owner in deleted:
                out.append(f"{resource.plural}/{meta['name']} of deleted {owner}")
            elif owner in expired and resource == JOBS:
                out.append(f"{resource.plural}/{meta['name']} not yet removed by its TTL")
    return out


def settle(plans: list[Plan], kube: Kube, namespace: str, log_tail: Callable[[], str]) -> None:
    """Every story at its end: terminal phases, deleted ones gone with their children, nothing
    stuck in deletion."""

    def terminal() -> list[str]:
        return terminal_problems(plans, World.read(kube, namespace))

    def detail() -> str:
        return "\n".join(terminal()) + f"\noperator log:\n{log_tail()}"

    _wait("every FineTuneJob in its terminal phase", lambda: not terminal(), CONVERGE_S, detail)
    left = partial(leftovers, plans, kube, namespace)
    _wait("no leftovers and nothing stuck in deletion", lambda: not left(), 60, lambda: "\n".join(left()))


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture
def fault_namespace(local_env: LocalEnv, namespace: str) -> str:
    """A fresh namespace, with the CRD installed and served (a CRD just changed answers 429 a while)."""
    stack.install_crd(local_env)
    kube = Kube.connect(local_env.kubeconfig)

    def served() -> bool:
        try:
            kube.list(FINETUNEJOBS, namespace)
        except Exception:
            return False
        return True

    _wait("the FineTuneJob API to be served", served, 60, lambda: "")
    return namespace


@pytest.fixture
def operators(
    local_env: LocalEnv, fault_namespace: str, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """``operators(tag, **env)``: operator processes, all SIGKILLed at the end."""
    made: list[OperatorProcess] = []

    def make(tag: str = "operator", **extra_env: str) -> OperatorProcess:
        made.append(OperatorProcess(local_env, fault_namespace, tmp_path, tag, **extra_env))
        return made[-1]

    try:
        yield make
    finally:
        for op in made:
            if op.proc is not None:
                op.kill()


@pytest.fixture
def operator_process(operators: Callable[..., OperatorProcess]) -> OperatorProcess:
    return operators()


def _wait(what: str, probe: Callable[[], Any], timeout: float, detail: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(TICK_S)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{detail()}")


def test_operator_sigkilled_at_random_moments(
    local_env: LocalEnv, fault_namespace: str, operator_process: OperatorProcess
) -> None:
    seed = int(os.environ.get("KUBETUNE_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nfault seed: KUBETUNE_FAULT_SEED={seed} ({JOBS_COUNT} jobs, >= {MIN_KILLS} kills)", flush=True)
    rng = random.Random(seed)
    namespace = fault_namespace
    kube = Kube.connect(local_env.kubeconfig)
    plans = make_plans(rng, JOBS_COUNT)
    # The kill schedule, drawn up front: (killed during start-up/resume, how long it lives, how
    # long it stays dead, and how long after one of the test's changes it is killed: 0-300 ms, while
    # it reacts to a pod that started or ended, a suspend, a creation). Timing differs between
    # runs; the decisions do not.
    schedule = [(rng.random() < 0.25, rng.uniform(0.1, 2.5), rng.uniform(0.5, 5.0), rng.uniform(0.0, 3.0),
                 rng.uniform(0.0, 0.3)) for _ in range(10_000)]  # fmt: skip
    watch, statuses = JobWatch(kube, namespace), StatusWatch(kube, namespace)
    watch.start()
    statuses.start()
    driver = Driver(kube, namespace, plans)
    op = operator_process
    started = time.monotonic()
    kills = Counter[str]()
    behind: list[int] = []  # FineTuneJobs whose status a kill left behind reality
    converge_s: list[float] = []  # from the restart (process start) to every status true
    ready_s: list[float] = []

    def problems() -> list[str]:
        return convergence_problems(plans, World.read(kube, namespace))

    def detail() -> str:
        return "\n".join(problems()[:20]) + f"\noperator log:\n{op.log_tail()}"

    for early, early_life, life, dead, lag in schedule:
        if driver.all_done() and sum(kills.values()) >= MIN_KILLS:
            break
        assert time.monotonic() - started < BUDGET_S, f"not done within {BUDGET_S:.0f}s:\n{detail()}"
        op.spawn()
        spawned = time.monotonic()
        if early:  # killed while starting up or resuming: the world moves on meanwhile
            driver.run_for(early_life)
            op.kill()
            kills["start-up"] += 1
        else:
            _wait("the operator's /healthz", op.healthy, 60, detail)
            ready_s.append(time.monotonic() - spawned)
            _wait("every status to converge after the restart", lambda: not problems(), CONVERGE_S, detail)
            converge_s.append(time.monotonic() - spawned)
            driver.run_for(life, then_until_action=True)  # the operator at work
            time.sleep(lag)
            op.kill()
            kills["at work"] += 1
            behind.append(len({p.split(":")[0] for p in problems()}))
        driver.run_for(dead, operator_alive=False)

    # The last start: nothing is killed any more; everything must settle.
    op.spawn()
    spawned = time.monotonic()
    _wait("the operator's /healthz", op.healthy, 60, detail)
    _wait("every status to converge after the last restart", lambda: not problems(), CONVERGE_S, detail)
    converge_s.append(time.monotonic() - spawned)

    settle(plans, kube, namespace, op.log_tail)
    watch.stop()
    statuses.stop()
    assert not statuses.regressions(), f"status writes that undid each other: {statuses.regressions()}"

    # Exactly one Job per FineTuneJob, created once.
    world = World.read(kube, namespace)
    duplicates = {owner: sorted(uids) for owner, uids in watch.uids.items() if len(uids) > 1}
    assert not duplicates, f"Jobs created more than once: {duplicates}"
    for plan in plans:
        jobs = kube.list(JOBS, namespace, f"{names.LABEL_FINETUNEJOB}={plan.name}")
        if plan.outcome in (Outcome.DELETE, Outcome.TTL):
            assert len(jobs) == 0, f"{plan.name}: {len(jobs)} Jobs left"
        else:
            assert len(jobs) == 1, f"{plan.name}: {len(jobs)} Jobs"
            assert watch.uids[plan.name] == {jobs[0]["metadata"]["uid"]}
        if plan.outcome != Outcome.DELETE:
            assert len(watch.uids[plan.name]) == 1, f"{plan.name}: its Job was never seen"
            status = world.ftjs[plan.name]["status"]
            if plan.outcome == Outcome.FAIL:
                assert (status["exitCode"], status["attempts"]) == (int(ExitCode.INVALID_DATA), 1), status
            elif plan.outcome == Outcome.RETRY:
                assert (status["exitCode"], status["attempts"]) == (0, 2), status
            elif plan.outcome != Outcome.TTL:  # an expired Job's pods may be gone before they are read
                assert status["exitCode"] == 0, status
            assert status.get("completionTime"), status
            assert status.get("startTime"), status
    assert not convergence_problems(plans, world)

    deleted = {p.name for p in plans if p.outcome == Outcome.DELETE}
    wall = time.monotonic() - started
    logs = op.all_logs()
    mix = dict(Counter(p.outcome.value for p in plans))
    print(
        f"fault summary: seed {seed}; {len(plans)} FineTuneJobs {mix}; "
        f"{sum(kills.values())} SIGKILLs {dict(kills)}, {op.starts} starts; "
        f"{sum(1 for b in behind if b)} of {len(behind)} kills at work left statuses behind reality "
        f"({sum(behind)} in all); "
        f"{driver.actions_while_down} user/kubelet actions while no operator ran; "
        f"status converged {max(converge_s):.1f}s at most after a start "
        f"(median {statistics.median(converge_s):.1f}s, {len(converge_s)} checks; /healthz median "
        f"{statistics.median(ready_s or [0.0]):.1f}s); "
        f"Jobs created {sum(len(u) for u in watch.uids.values())} for {len(plans) - len(deleted)} kept + "
        f"{len(deleted)} deleted FineTuneJobs, 0 twice; 0 stuck in deletion; "
        f"{statuses.writes} status phase changes, 0 undone; "
        f"{logs.count('Traceback')} tracebacks in the operator logs; wall {wall:.0f}s",
        flush=True,
    )


def test_a_job_that_expires_while_no_operator_runs_keeps_its_outcome(
    local_env: LocalEnv, fault_namespace: str, operator_process: OperatorProcess
) -> None:
    """ttlSecondsAfterFinished may delete a finished Job before any operator has read it: the Job
    then waits (a finalizer) for its outcome to be recorded, so the job shows Succeeded, not
    Failed/JobDeleted. A FineTuneJob deleted meanwhile does not keep its Job waiting."""
    namespace, op = fault_namespace, operator_process
    kube = Kube.connect(local_env.kubeconfig)
    expired = Plan("expired", Outcome.TTL, 0.0, [0.0, 0.0], STEPS[Outcome.TTL], ttl=0)
    orphan = Plan("orphan", Outcome.DELETE, 0.0, [0.0, 0.0], STEPS[Outcome.DELETE], ttl=0)
    driver = Driver(kube, namespace, [expired, orphan])

    def world() -> World:
        return World.read(kube, namespace)

    def phase(plan: Plan) -> str | None:
        ftj = world().ftjs.get(plan.name) or {}
        found: str | None = (ftj.get("status") or {}).get("phase")
        return found

    def job_state(plan: Plan) -> str:
        job = kube.get(JOBS, namespace, names.job_name(plan.name))
        return "gone" if job is None else "deleting" if _deleting(job) else "there"

    def is_phase(plan: Plan, wanted: str) -> bool:
        return phase(plan) == wanted

    def job_in(plan: Plan, states: tuple[str, ...]) -> bool:
        return job_state(plan) in states

    def detail() -> str:
        jobs = {p.name: (phase(p), job_state(p)) for p in (expired, orphan)}
        return f"(phase, Job) {jobs}\noperator log:\n{op.log_tail()}"

    op.spawn()
    _wait("the operator's /healthz", op.healthy, 60, detail)
    for plan in (expired, orphan):
        plan.uid = driver.create(plan)
        _wait(f"{plan.name}'s pod to run", partial(driver.act, "run", plan), 60, detail)
        _wait(f"{plan.name} Running", partial(is_phase, plan, "Running"), 60, detail)
    op.kill()

    # No operator: the trainer finishes and the TTL controller deletes its Job at once; the other
    # FineTuneJob is deleted, so the garbage collector deletes its (still running) Job.
    _wait("the trainer to exit 0", partial(driver.act, "exit:0", expired), 30, detail)
    kube.delete(FINETUNEJOBS, namespace, orphan.name)
    for plan in (expired, orphan):
        _wait(f"{plan.name}'s Job to be deleted", partial(job_in, plan, ("deleting", "gone")), 60, detail)

    op.spawn()
    _wait("the expired job's outcome", lambda: phase(expired) in ("Succeeded", "Failed"), 60, detail)
    status = world().ftjs[expired.name]["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed"), status
    for plan in (expired, orphan):
        _wait(f"{plan.name}'s Job to be gone", partial(job_in, plan, ("gone",)), 60, detail)
    _wait("the orphan's pods to be gone", lambda: not world().pods.get(orphan.name), 60, detail)


#: kopf's peering lifetime (docs/operator.md: "a crashed one is considered gone after 60 s").
PEERING_LIFETIME_S = 60.0
#: After the lifetime: the survivor's own touch, the re-evaluation and its first writes.
TAKEOVER_SLACK_S = 15.0
KOPF_PEERINGS = Resource("kopf.dev/v1", "kopfpeerings")
CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_a_killed_replica_is_replaced_by_its_peer_within_the_peering_lifetime(
    local_env: LocalEnv, fault_namespace: str, operators: Callable[..., OperatorProcess]
) -> None:
    """Two replicas with kopf peering; the serving one SIGKILLed while at work: the paused one
    takes over within the documented time, wrote nothing before, and everything converges."""
    seed = int(os.environ.get("KUBETUNE_FAULT_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\npeering seed: KUBETUNE_FAULT_SEED={seed}", flush=True)
    rng = random.Random(seed)
    namespace = fault_namespace
    kube = Kube.connect(local_env.kubeconfig)
    local_env.kubectl("apply", "--server-side", "-f", str(CRDS / "kopf.dev_kopfpeerings.yaml"))
    local_env.wait_established("kopfpeerings.kopf.dev")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubetune"}}
    kube.request("POST", KOPF_PEERINGS.path(namespace), body=peering)
    serving = operators("serving", KUBETUNE_PEERING="kubetune", KUBETUNE_PEERING_PRIORITY="200")
    standby = operators("standby", KUBETUNE_PEERING="kubetune", KUBETUNE_PEERING_PRIORITY="100")
    plans = make_plans(rng, 12)
    watch, statuses = JobWatch(kube, namespace), StatusWatch(kube, namespace)
    watch.start()
    statuses.start()
    driver = Driver(kube, namespace, plans)

    def problems() -> list[str]:
        return convergence_problems(plans, World.read(kube, namespace))

    def detail() -> str:
        return "\n".join(problems()[:20]) + f"\nstandby log:\n{standby.log_tail()}"

    def both_registered() -> bool:
        peers = (kube.get(KOPF_PEERINGS, namespace, "kubetune") or {}).get("status") or {}
        return len(peers) == 2

    serving.spawn()
    standby.spawn()
    for op in (serving, standby):
        _wait(f"{op.tag}'s /healthz", op.healthy, 60, detail)
    _wait("both replicas in the peering", both_registered, 60, detail)

    driver.run_for(rng.uniform(3.0, 8.0), then_until_action=True)  # the serving replica at work
    time.sleep(rng.uniform(0.0, 0.3))
    serving.kill()
    killed = time.monotonic()
    behind = len({p.split(":")[0] for p in problems()})

    def resumed() -> bool:
        driver.run_for(TICK_S, operator_alive=False)  # users and pods go on while nobody serves
        return "Resuming operations" in standby.output()

    _wait("the standby replica to take over", resumed, PEERING_LIFETIME_S + TAKEOVER_SLACK_S, detail)
    takeover = time.monotonic() - killed
    _wait("every status to converge after the takeover", lambda: not problems(), CONVERGE_S, detail)
    converged = time.monotonic() - killed - takeover
    while not driver.all_done():
        assert time.monotonic() - killed < 120 + PEERING_LIFETIME_S, detail()
        driver.run_for(1.0)
    _wait("every status to converge", lambda: not problems(), CONVERGE_S, detail)
    settle(plans, kube, namespace, standby.log_tail)

    # No conflicting writes: the standby ran no handler before it took over, the killed replica
    # none after it died; no Job was created twice and no status write undid another.
    before_takeover = standby.output().split("Resuming operations")[0]
    assert "Handler '" not in before_takeover, before_takeover
    watch.stop()
    statuses.stop()
    duplicates = {owner: uids for owner, uids in watch.uids.items() if len(uids) > 1}
    assert not duplicates, f"Jobs created more than once: {duplicates}"
    assert not statuses.regressions(), f"status writes that undid each other: {statuses.regressions()}"
    assert takeover <= PEERING_LIFETIME_S + TAKEOVER_SLACK_S
    print(
        f"peering summary: seed {seed}; SIGKILLed the serving replica with {behind} of {len(plans)} "
        f"FineTuneJobs' statuses behind; the standby took over {takeover:.1f}s later (kopf peering "
        f"lifetime {PEERING_LIFETIME_S:.0f}s) and every status was true {converged:.1f}s after the "
        f"takeover; {driver.actions_while_down} user/kubelet actions meanwhile; 0 handler runs by the "
        f"standby before the takeover; Jobs created {sum(len(u) for u in watch.uids.values())}, 0 twice",
        flush=True,
    )
