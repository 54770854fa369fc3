"""The object store and the API server go away mid-run (issue 16, faults 3 and 4).

Everything is real: kube-apiserver, etcd, kube-controller-manager, versitygw, the node agent
running the trainer pod as a local process, the operator as its own process, and QLoRA on a tiny
Llama on CPU. The environment is this module's own, so stopping its S3 server or its API server
disturbs no other test.

Fault 3: versitygw is SIGKILLed (no goodbye: the trainer's next connections are refused) while
the trainer uploads a checkpoint (the folder ``step-N/`` has files, its ``_COMPLETE`` marker is
not there yet) and again while it publishes the result (a result file is there, ``manifest.json``
is not). Each time it stays down ``S3_DOWN_S`` and is started again with the same command line:
same port, same data, same keys. The outages are timed by watching the bucket's folder on disk
(versitygw's posix backend writes each object by rename, so a file there is a whole object).
Checked: the trainer waits the outage out in the same process (one pod, no failed attempt, the
waits logged); the interrupted checkpoint is completed, and every checkpoint with a marker holds
the number of files its marker names; the job succeeds; every file ``manifest.json`` lists is in
S3 with its size and sha256, and nothing else was published.

Fault 4: kube-apiserver is stopped (SIGTERM, as a restart does) while the trainer trains, with
progress in status, and started again after ``API_DOWN_S`` on the same port with the same
certificates and etcd. Checked: the trainer process was not restarted (the same pod uid, no other
pod, no failed attempt, no resume), its progress reports go on after the restart (status step
advances past the step reached before the outage), the operator (same process) brings the
status to Succeeded with the right observedGeneration, there is one Job (the same uid), and the
node agent, the controller manager and the operator are the processes they were before.

Bounded: 2 FineTuneJobs, every wait on a condition with a deadline, a pytest timeout per test;
127.0.0.1 only. The figures in docs/reliability.md come from::

    .venv/bin/pytest tests/faults/test_outages.py -s -p no:cacheprovider
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import wellknown
from kubetune_localenv import stack
from kubetune_localenv.agents import container_log, start_agent
from kubetune_localenv.cluster import LOCALHOST, LocalEnv, ManagedProcess
from kubetune_operator import names
from kubetune_operator.kube import FINETUNEJOBS, JOBS, PODS, Kube

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Obj = dict[str, Any]

#: How long the S3 server stays down each time (issue 16: "stopped for 20 s").
S3_DOWN_S = 20.0
#: How long kube-apiserver stays stopped before it is started again (then it needs a few seconds
#: more to answer /readyz).
API_DOWN_S = 10.0
#: SIGTERM to SIGKILL when stopping kube-apiserver (with clients attached it does not exit by itself).
API_STOP_GRACE_S = 3.0
TRAIN_TIMEOUT = 240.0
RESUMED = re.compile(r"checkpoint: resuming from step (\d+) ")
#: What the trainer logs while it waits for the object store (storage.ride_out_outage).
WAITING = re.compile(r"storage: (upload of \S+) failed \(.*\); retrying in ")
WAITED = re.compile(r"storage: upload of \S+ done after ([\d.]+)s of waiting for the store")
REPORT_FAILED = "progress: could not patch the FineTuneJob status"
REPORTING_AGAIN = re.compile(r"progress: the FineTuneJob status is patched again, after (\d+) failed attempt")


# --- the environment --------------------------------------------------------------------------------


@dataclass
class Outages:
    env: LocalEnv
    kube: Kube
    s3: Any
    work: Path
    operator: ManagedProcess

    def component(self, name: str) -> ManagedProcess:
        return next(p for p in self.env.processes if p.name == name)

    def namespace(self, prefix: str) -> str:
        namespace = f"{prefix}-{secrets.token_hex(3)}"
        stack.ensure_namespace(self.env, namespace)
        stack.create_credentials_secret(self.env, namespace)
        return namespace

    def bucket(self) -> str:
        bucket = "outage-" + secrets.token_hex(4)
        stack.upload_tiny_inputs(self.env, bucket, self.work)
        return bucket

    def apply(
        self, namespace: str, name: str, bucket: str, *, max_steps: int, save_steps: int
    ) -> stack.TinyJob:
        job = stack.render_tiny_job(
            self.env,
            name=name,
            namespace=namespace,
            bucket=bucket,
            max_steps=max_steps,
            save_steps=save_steps,
        )
        manifest = yaml.safe_load(job.manifest)
        manifest["spec"]["lifecycle"]["terminationGracePeriodSeconds"] = 30
        self.env.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        return job

    def ftj(self, job: stack.TinyJob) -> Obj:
        obj = self.kube.get(FINETUNEJOBS, job.namespace, job.name)
        assert obj is not None, f"FineTuneJob {job.namespace}/{job.name} is gone"
        return obj

    def ftj_past(self, job: stack.TinyJob, step: int) -> Obj | None:
        """The FineTuneJob once its status.progress.step is past ``step``."""
        obj = self.ftj(job)
        return obj if _step(obj) > step else None

    def finished(
        self, job: stack.TinyJob, timeout: float = TRAIN_TIMEOUT, on_tick: Callable[[], None] | None = None
    ) -> Obj:
        def done() -> Obj | None:
            obj = self.ftj(job)
            return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        result: Obj = stack.wait_for(f"{job.name} to finish", done, timeout, on_tick, interval=0.1)
        return result

    def pods(self, job: stack.TinyJob) -> list[Obj]:
        return self.kube.list(PODS, job.namespace, f"{names.LABEL_FINETUNEJOB}={job.name}")

    def running_pod(self, job: stack.TinyJob, timeout: float = TRAIN_TIMEOUT) -> Obj:
        def running() -> Obj | None:
            for pod in self.pods(job):
                statuses = pod.get("status", {}).get("containerStatuses") or []
                if any("running" in s["state"] for s in statuses):
                    return pod
            return None

        pod: Obj = stack.wait_for(f"a running trainer pod of {job.name}", running, timeout, interval=0.5)
        return pod

    def log(self, pod: Obj) -> str:
        return container_log(self.env, pod, names.TRAINER_CONTAINER)


@pytest.fixture(scope="module")
def outages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outages]:
    """A control plane of its own (its S3 server and API server get stopped), a node agent, the operator."""
    env = LocalEnv(tmp_path_factory.mktemp("outages"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    try:
        stack.install_crd(env)
        operator = stack.start_operator(env)
        work = tmp_path_factory.mktemp("outages-work")
        yield Outages(env, Kube.connect(env.kubeconfig), stack.s3_client(env), work, operator)
    finally:
        env.stop()


# --- stopping and starting a component on its own port ---------------------------------------------


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _s3_port(env: LocalEnv) -> int:
    assert env.s3 is not None
    return int(env.s3.endpoint.rsplit(":", 1)[1])


def _kill(proc: ManagedProcess) -> None:
    assert proc.popen is not None, f"{proc.name} was never started"
    assert proc.alive(), f"{proc.name} is not running"
    proc.popen.kill()
    proc.popen.wait(10)


def _start_again(proc: ManagedProcess, ready: Callable[[], bool], what: str) -> float:
    """Start ``proc`` with its own command line (same port, same data); when it is ready."""
    proc.start()
    stack.wait_for(f"{what} to answer again", ready, 60, interval=0.05)
    return time.monotonic()


# --- fault 3: the S3 server stopped mid-upload ------------------------------------------------------


@dataclass
class Outage:
    """One stop of the S3 server: when, what the bucket held, and when it answered again."""

    during: str
    stopped: float
    present: list[str]
    answered: float = 0.0
    #: The step of the checkpoint being uploaded (None: the publish).
    step: int | None = None

    @property
    def seconds(self) -> float:
        return self.answered - self.stopped


@dataclass
class S3Stopper:
    """Watches the output prefix in versitygw's data folder and stops the server at the moments wanted.

    First a checkpoint with files and without its marker (step >= ``min_step``), then the result
    with a file and without ``manifest.json``; each time SIGKILL, ``S3_DOWN_S`` down, start again.
    A stop that came too late (the marker had landed before the server died) does not count:
    the server is started again at once and the next checkpoint is waited for.

    A thread watches and kills (within milliseconds); :meth:`tick`, called by the test's own
    thread while it waits, starts the server again: a component dies with the thread that
    started it (``PR_SET_PDEATHSIG``), and the watcher thread ends before the next test.
    """

    env: LocalEnv
    output: Path
    min_step: int
    deadline: float
    outages: list[Outage] = field(default_factory=list)
    missed: list[int] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None
    restart_at: float | None = None
    restarted: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="s3-stopper", daemon=True)
        self.thread.start()

    def tick(self) -> None:
        """Start the server again once its outage is over (on the caller's thread)."""
        if self.restart_at is not None and time.monotonic() >= self.restart_at:
            self.restart_at = None
            _start_again(self.proc, lambda: _port_open(_s3_port(self.env)), "versitygw")
            self.restarted.set()

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.tick()
            self.thread.join(0.1)
        if not self.proc.alive():  # the watcher failed (or timed out) with the server down
            self.proc.start()
        assert not self.thread.is_alive(), "the S3 stopper did not finish"
        if self.error is not None:
            raise self.error

    @property
    def proc(self) -> ManagedProcess:
        return next(p for p in self.env.processes if p.name == "versitygw")

    def _poll(self, check: Callable[[], Any], what: str) -> Any:
        while time.monotonic() < self.deadline:
            found = check()
            if found:
                return found
            time.sleep(0.002)
        raise TimeoutError(f"S3 stopper: no {what} before the deadline")

    def _in_flight_checkpoint(self) -> tuple[int, Path] | None:
        folder = self.output / wellknown.CHECKPOINTS_DIR
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return None
        for entry in entries:
            match = re.fullmatch(r"step-(\d+)", entry.name)
            step = int(match.group(1)) if match else -1
            if step < self.min_step or step in self.missed:
                continue
            path = Path(entry.path)
            if (path / wellknown.CHECKPOINT_MARKER).exists():
                continue
            if any(p.is_file() for p in path.iterdir()):
                return step, path
        return None

    def _publishing(self) -> bool:
        try:
            entries = list(os.scandir(self.output))
        except FileNotFoundError:
            return False
        # Not the preflight's probe object (".kubetune-write-probe-..."): a result file.
        return any(
            e.is_file() and e.name != wellknown.MANIFEST and not e.name.startswith(".") for e in entries
        )

    def _down_until_restarted(self, seconds: float) -> float:
        """Have :meth:`tick` start the server ``seconds`` after it was stopped; when it answered."""
        self.restarted.clear()
        self.restart_at = time.monotonic() + seconds
        if not self.restarted.wait(seconds + 90):
            raise TimeoutError("S3 stopper: the server was not started again (is tick() called?)")
        return time.monotonic()

    def _run(self) -> None:
        try:
            while True:  # a checkpoint upload
                step, folder = self._poll(self._in_flight_checkpoint, "checkpoint upload")
                _kill(self.proc)
                stopped = time.monotonic()
                if (folder / wellknown.CHECKPOINT_MARKER).exists():  # too late: it had completed
                    self.missed.append(step)
                    self._down_until_restarted(0)
                    continue
                present = sorted(p.name for p in folder.iterdir() if p.is_file())
                outage = Outage("checkpoint upload", stopped, present, step=step)
                outage.answered = self._down_until_restarted(S3_DOWN_S)
                self.outages.append(outage)
                break
            self._poll(self._publishing, "result file")
            _kill(self.proc)
            stopped = time.monotonic()
            present = sorted(e.name for e in os.scandir(self.output) if e.is_file())
            outage = Outage("final publish", stopped, present)
            outage.answered = self._down_until_restarted(S3_DOWN_S)
            self.outages.append(outage)
        except BaseException as exc:  # reported by join()
            self.error = exc


@pytest.mark.timeout(360)
def test_s3_stopped_for_20s_mid_checkpoint_and_mid_publish_the_trainer_waits_and_publishes_whole(
    outages: Outages,
) -> None:
    started = time.monotonic()
    save_steps, max_steps = 4, 12
    namespace = outages.namespace("s3-outage")
    bucket = outages.bucket()
    job = outages.apply(namespace, "s3-outage", bucket, max_steps=max_steps, save_steps=save_steps)
    output = outages.env.state_dir / "s3data" / bucket / job.output_prefix
    stopper = S3Stopper(outages.env, output, min_step=2 * save_steps, deadline=started + TRAIN_TIMEOUT)
    stopper.start()

    done = outages.finished(job, timeout=TRAIN_TIMEOUT + 2 * S3_DOWN_S, on_tick=stopper.tick)
    stopper.join(30)
    wall = time.monotonic() - started
    status = done["status"]
    pods = outages.pods(job)
    logs = [outages.log(pod) for pod in pods]
    figures = {
        "outages": [
            {
                "during": o.during,
                "step": o.step,
                "objects there": len(o.present),
                "down s": round(o.seconds, 1),
            }
            for o in stopper.outages
        ],
        "missed": stopper.missed,
        "pods": len(pods),
        # Per pod: the trainer's logged waits, and how long each write waited until it went through.
        "waits": [len(WAITING.findall(text)) for text in logs],
        "waited s": [[float(s) for s in WAITED.findall(text)] for text in logs],
        "resumed": [RESUMED.findall(text) for text in logs],
        "phase": status.get("phase"),
        "wall s": round(wall),
    }
    print(f"\nS3 outages: {json.dumps(figures)}")
    assert [o.during for o in stopper.outages] == ["checkpoint upload", "final publish"], figures
    ckpt_outage, publish_outage = stopper.outages
    assert ckpt_outage.present, figures
    assert wellknown.CHECKPOINT_MARKER not in ckpt_outage.present, figures
    assert publish_outage.present, figures
    assert wellknown.MANIFEST not in publish_outage.present, figures
    assert all(o.seconds >= S3_DOWN_S for o in stopper.outages), figures

    # The same trainer process waited both outages out: one pod, no failed attempt, no resume.
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == max_steps
    assert len(pods) == 1, figures
    trainer_job = outages.kube.get(JOBS, namespace, names.job_name(job.name))
    assert trainer_job is not None
    assert not trainer_job["status"].get("failed"), trainer_job["status"]
    log = logs[0]
    assert not RESUMED.findall(log), figures
    waited_for = WAITING.findall(log)
    assert any(f"step-{ckpt_outage.step}/" in what for what in waited_for), waited_for
    assert any(f"/{job.output_prefix}/" in what and "/checkpoints/" not in what for what in waited_for), (
        waited_for
    )

    # Every checkpoint with a marker is whole: the marker counts its files, all in S3.
    stored = stack.folder_objects(outages.s3, bucket, job.output_prefix)
    by_step: dict[str, set[str]] = {}
    for key in stored:
        if key.startswith(f"{wellknown.CHECKPOINTS_DIR}/"):
            step, _, rest = key.removeprefix(f"{wellknown.CHECKPOINTS_DIR}/").partition("/")
            by_step.setdefault(step, set()).add(rest)
    assert f"step-{ckpt_outage.step}" in by_step, sorted(by_step)  # among the saveTotalLimit newest
    for step, files in by_step.items():
        assert wellknown.CHECKPOINT_MARKER in files, f"{step} has no marker: {sorted(files)}"
        marker = json.loads(
            stack.object_bytes(outages.s3, bucket, f"{job.output_prefix}/checkpoints/{step}/_COMPLETE")
        )
        assert marker["files"] == len(files) - 1, (step, marker, sorted(files))

    # The manifest lists every published file, with sizes and sha256s matching the objects.
    manifest = json.loads(stack.object_bytes(outages.s3, bucket, f"{job.output_prefix}/{wellknown.MANIFEST}"))
    listed = {entry["path"]: entry for entry in manifest["files"]}
    published = {key for key in stored if not key.startswith(f"{wellknown.CHECKPOINTS_DIR}/")}
    assert set(listed) == published - {wellknown.MANIFEST}, (sorted(listed), sorted(published))
    for path, entry in listed.items():
        data = stack.object_bytes(outages.s3, bucket, f"{job.output_prefix}/{path}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), path
    assert "adapter_model.safetensors" in listed


# --- fault 4: kube-apiserver restarted mid-run -------------------------------------------------------


def _step(obj: Obj) -> int:
    return int((obj.get("status", {}).get("progress") or {}).get("step") or 0)


@dataclass
class CheckpointHold:
    """Keeps the trainer from finishing while the API server is down, however fast it trains.

    Once :meth:`start`-ed, the first checkpoint folder that appears pauses the S3 server
    (SIGSTOP: its connections stay open, unanswered), so the trainer waits in that checkpoint's
    upload; :meth:`release` lets it go on (SIGCONT), well inside botocore's 120 s read timeout.
    The trainer trains, and tries to report, until it reaches that checkpoint.
    """

    proc: ManagedProcess
    folder: Path
    paused_at: float | None = None
    held_s: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        existing = set(os.listdir(self.folder)) if self.folder.exists() else set()

        def watch() -> None:
            while not self._done.wait(0.005):
                if self.folder.exists() and set(os.listdir(self.folder)) - existing:
                    assert self.proc.popen is not None
                    self.proc.popen.send_signal(signal.SIGSTOP)
                    self.paused_at = time.monotonic()
                    return

        self._thread = threading.Thread(target=watch, name="checkpoint-hold", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._done.set()
        assert self._thread is not None
        self._thread.join(5)
        if self.paused_at is not None:
            assert self.proc.popen is not None
            self.proc.popen.send_signal(signal.SIGCONT)
            self.held_s = time.monotonic() - self.paused_at


@pytest.mark.timeout(360)
def test_kube_apiserver_restarted_mid_run_training_goes_on_and_status_converges(outages: Outages) -> None:
    started = time.monotonic()
    env = outages.env
    save_steps, max_steps = 60, 120
    namespace = outages.namespace("api-restart")
    bucket = outages.bucket()
    job = outages.apply(namespace, "api-restart", bucket, max_steps=max_steps, save_steps=save_steps)
    pod = outages.running_pod(job)

    def training_in_status() -> Obj | None:
        obj = outages.ftj(job)
        progress = obj.get("status", {}).get("progress") or {}
        return obj if obj["status"].get("phase") == "Running" and progress.get("totalSteps") else None

    stack.wait_for("training progress in status", training_in_status, TRAIN_TIMEOUT, interval=0.2)
    trainer_job = outages.kube.get(JOBS, namespace, names.job_name(job.name))
    assert trainer_job is not None
    pids = {p.name: p.pid for p in env.processes}
    output = env.state_dir / "s3data" / bucket / job.output_prefix
    hold = CheckpointHold(outages.component("versitygw"), output / wellknown.CHECKPOINTS_DIR)

    # Stop: SIGTERM (kube-apiserver stops listening at once, but keeps its open connections for
    # up to a minute), then SIGKILL after API_STOP_GRACE_S, as a kubelet's grace period would.
    apiserver = outages.component("kube-apiserver")
    step_before = _step(outages.ftj(job))

    def ready() -> bool:
        try:
            return env.api_get("/readyz", timeout=2) == b"ok"
        except OSError:
            return False

    hold.start()
    try:
        stopping = time.monotonic()
        apiserver.stop(grace=API_STOP_GRACE_S)
        stopped = time.monotonic()
        time.sleep(max(0.0, stopping + API_DOWN_S - time.monotonic()))
        answered = _start_again(apiserver, ready, "kube-apiserver")
        answered_wall = time.time()
    finally:
        hold.release()

    def reported_since_the_restart() -> Obj | None:
        obj = outages.ftj(job)
        progress = obj.get("status", {}).get("progress") or {}
        update = progress.get("updateTime")
        recent = update is not None and _epoch(update) >= int(answered_wall)
        return obj if recent and _step(obj) > step_before else None

    resumed: Obj = stack.wait_for(
        "progress reports after the restart", reported_since_the_restart, TRAIN_TIMEOUT, interval=0.1
    )
    reported_after = time.monotonic() - answered
    done = outages.finished(job)
    wall = time.monotonic() - started

    status = done["status"]
    pods = outages.pods(job)
    log = outages.log(pod)
    jobs = outages.kube.list(JOBS, namespace)
    agent_log = outages.component("nodeagent-kubetune-local").log_path.read_text(errors="replace")
    again = REPORTING_AGAIN.findall(log)
    figures = {
        "step at stop": step_before,
        "first step reported after": _step(resumed),
        "SIGTERM to exit s": round(stopped - stopping, 1),
        "unavailable s": round(answered - stopping, 1),
        "first report after ready s": round(reported_after, 1),
        "trainer held at a checkpoint s": round(hold.held_s, 1),
        "failed patches": [int(n) for n in again],
        "pods": len(pods),
        "jobs": len(jobs),
        "phase": status.get("phase"),
        "wall s": round(wall),
    }
    print(f"\nkube-apiserver restart: {json.dumps(figures)}")

    # Training was not interrupted: one pod, the same one, no failed attempt, no resume; its
    # reports failed while the API server was away (logged once) and work again (logged once).
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert [p["metadata"]["uid"] for p in pods] == [pod["metadata"]["uid"]], figures
    assert not RESUMED.findall(log), log[-3000:]
    assert log.count(REPORT_FAILED) == 1, figures
    assert len(again) == 1, figures
    assert _step(resumed) > step_before
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == max_steps
    # The operator reconnected: status converged, for the FineTuneJob's current generation.
    assert status["observedGeneration"] == done["metadata"]["generation"], status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True", conditions
    assert all(c["observedGeneration"] == done["metadata"]["generation"] for c in conditions.values())
    # No duplicate Job, no failed attempt.
    assert [j["metadata"]["uid"] for j in jobs] == [trainer_job["metadata"]["uid"]], figures
    assert not jobs[0]["status"].get("failed"), jobs[0]["status"]
    # The other clients of the API server came through as the same processes, the agent's pod
    # worker too (a worker that fails kills its pod's containers).
    for name in ("operator", "nodeagent-kubetune-local", "kube-controller-manager", "etcd", "versitygw"):
        proc = outages.component(name)
        assert proc.alive(), f"{name} died"
        assert proc.pid == pids[name], f"{name} was restarted"
    assert "worker failed" not in agent_log, agent_log[-3000:]


def _epoch(rfc3339: str) -> int:
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))
