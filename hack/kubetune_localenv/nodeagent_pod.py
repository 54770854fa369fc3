"""One pod on the node agent's node: runs its containers and reports its status.

Each pod gets a :class:`PodWorker` thread for its whole life on the node.  The
thread starts the container processes (through :mod:`nodeagent_exec`), so it
also must outlive them: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked
a child exits, not only when the agent process does.

Layout of the pod's directory ``<state>/pods/<namespace>_<pod>/``:
``<container>.log`` (stdout+stderr, kept after the pod is gone), ``volumes/``,
``termination/<container>`` (bind-mounted at terminationMessagePath),
``run/`` (helper specs and exit statuses) and ``home/`` (HOME and the default
working directory).  Everything but the logs is removed when the pod is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import nodeagent_images as images
from .nodeagent_cgroup import MemoryCgroups
from .nodeagent_kube import STRATEGIC_MERGE_PATCH, ApiError, Kube
from .nodeagent_sched import parse_quantity
from .nodeagent_spec import NotReadyError, PodSpecResolver, expand

JSON = dict[str, Any]
EXEC_HELPER = Path(__file__).resolve().with_name("nodeagent_exec.py")
LOCAL_IP = "127.0.0.1"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_BYTES = 2048
FALLBACK_LOG_LINES = 80
RETRY_SECONDS = 2.0
IMAGE_RETRY_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0

log = logging.getLogger("nodeagent")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class AgentContext:
    """What every pod worker needs from the agent."""

    kube: Kube
    node_name: str
    state_dir: Path
    image_table: Callable[[], list[images.ImageRule]]
    node: Callable[[], JSON]
    restart_backoff: float = 10.0
    cgroups: MemoryCgroups | None = None


@dataclass
class ContainerRun:
    """One container of the pod: its process and its reported state."""

    spec: JSON
    init: bool
    restart_count: int = 0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    image_id: str = ""
    next_start: float = 0.0
    started_mono: float = 0.0
    log_offset: int = 0
    pull_failures: int = 0
    restart_pending: bool = False
    cgroup: Path | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> JSON | None:
        value = self.state.get("terminated")
        return value if isinstance(value, dict) else None

    def status(self) -> JSON:
        running = self.running
        result: JSON = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id,
            "ready": running,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            result["containerID"] = self.container_id
        return result


class PodWorker(threading.Thread):
    """Runs one pod: volumes, init containers in order, then the containers."""

    def __init__(self, ctx: AgentContext, pod: JSON, *, lost: bool = False) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.pod = pod
        self.uid = str(meta["uid"])
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.dir = ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}"
        self.lost = lost
        self.wake = threading.Event()
        self.finished = threading.Event()
        self.stop_grace: float | None = None
        self.delete_object = True
        self.shutdown = False
        spec = pod["spec"]
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        self.init_runs = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.runs = [ContainerRun(c, init=False) for c in spec.get("containers") or []]
        self.initialized = not self.init_runs
        self.volumes_ready = False
        self.failure: tuple[str, str] | None = None
        self.terminating = False
        self.start_time = str(pod.get("status", {}).get("startTime") or now_rfc3339())
        self.resolver = PodSpecResolver(ctx.kube, pod, ctx.node(), ctx.kube.port)
        self.volumes: dict[str, tuple[Path, bool]] = {}
        self._transitions: dict[str, tuple[str, str]] = {}
        self._last_sent: JSON | None = None
        self._retry_publish_at = 0.0

    # -- called by the agent -----------------------------------------------------
    def update(self, pod: JSON) -> None:
        self.pod = pod
        self.resolver.pod = pod
        self.wake.set()

    def request_stop(self, grace: float, *, delete_object: bool = True, shutdown: bool = False) -> None:
        """Terminate the containers (SIGTERM, ``grace`` seconds, SIGKILL), then finish."""
        # The flags first: the worker acts as soon as it sees stop_grace.
        self.delete_object = self.delete_object and delete_object
        self.shutdown = self.shutdown or shutdown
        if self.stop_grace is None or grace < self.stop_grace:
            self.stop_grace = grace
        self.wake.set()

    # -- the thread ----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: worker failed", self.key)
        finally:
            self._kill_all()
            self.finished.set()

    def _run(self) -> None:
        self._prepare_dir()
        if self.lost:
            self._mark_lost()
        elif any(c.get("restartPolicy") == "Always" for c in self.pod["spec"].get("initContainers") or []):
            self.failure = ("UnsupportedPodSpec", "the node agent does not run sidecar containers")
        while self.stop_grace is None and self.failure is None and not self._terminal():
            if not self.volumes_ready:
                self._prepare_volumes()
            else:
                self._step()
            self._publish()
            self.wake.wait(0.2 if self.volumes_ready else RETRY_SECONDS)
            self.wake.clear()
        self._publish()
        while self.stop_grace is None:
            self.wake.wait(1.0)
            self.wake.clear()
        if self._terminal():
            self.shutdown = False  # a finished pod keeps its phase when the agent stops
        self._terminate(self.stop_grace)
        self._publish(final=True)
        if self.delete_object:
            self._delete_object()
        self._cleanup()

    # -- steps ---------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        uid_file = self.dir / "uid"
        if self.dir.exists() and uid_file.exists() and uid_file.read_text() != self.uid:
            old = self.dir.with_name(f"{self.dir.name}.{uid_file.read_text()[:8]}")
            shutil.rmtree(old, ignore_errors=True)
            self.dir.rename(old)
        for sub in ("run", "termination", "home", "volumes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        uid_file.write_text(self.uid)

    def _prepare_volumes(self) -> None:
        try:
            self.volumes = self.resolver.write_volumes(self.dir / "volumes")
        except NotReadyError as exc:
            message = f"MountVolume.SetUp failed: {exc.message}"
            for run in [*self.init_runs, *self.runs]:
                run.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
            return
        except ApiError as exc:
            log.warning("pod %s: volumes: %s", self.key, exc)
            return
        self.volumes_ready = True
        for run in [*self.init_runs, *self.runs]:
            run.state = {
                "waiting": {"reason": "PodInitializing" if not self.initialized else "ContainerCreating"}
            }

    def _step(self) -> None:
        try:
            self.resolver.refresh_tokens()
        except ApiError as exc:
            log.warning("pod %s: token refresh: %s", self.key, exc)
        if not self.initialized:
            self._step_init()
            if not self.initialized:
                return
        for run in self.runs:
            self._advance(run)

    def _step_init(self) -> None:
        for run in self.init_runs:
            done = run.terminated is not None and run.terminated.get("exitCode") == 0
            if done:
                continue
            self._advance(run)
            term = run.terminated
            if term is not None and term.get("exitCode") != 0:
                self.failure = ("", f"init container {run.name} failed")
            return
        self.initialized = True

    def _advance(self, run: ContainerRun) -> None:
        """Start, poll or restart one container."""
        if run.popen is not None:
            if run.popen.poll() is None:
                return
            self._record_exit(run)
        if run.terminated is not None or time.monotonic() < run.next_start:
            return  # finished for good, or waiting for its (re)start time
        if run.restart_pending:
            run.restart_count += 1
            run.restart_pending = False
        self._start(run)

    def _should_restart(self, run: ContainerRun) -> bool:
        if self.terminating or self.stop_grace is not None:
            return False
        term = run.terminated or {}
        if self.restart_policy == "Always" and not run.init:
            return True
        return self.restart_policy != "Never" and term.get("exitCode") != 0

    # -- containers ------------------------------------------------------------------
    def _waiting(self, run: ContainerRun, reason: str, message: str, retry: float) -> None:
        run.state = {"waiting": {"reason": reason, "message": message}}
        run.next_start = time.monotonic() + retry

    def _start(self, run: ContainerRun) -> None:
        image = str(run.spec.get("image", ""))
        rule = images.resolve(self.ctx.image_table(), image)
        if rule is None:
            run.pull_failures += 1
            reason = "ErrImagePull" if run.pull_failures == 1 else "ImagePullBackOff"
            message = (
                f'Failed to pull image "{image}": no rule for '
                f'"{images.normalize(image)}" in the node agent\'s image table'
            )
            if reason == "ImagePullBackOff":
                message = f'Back-off pulling image "{image}": {message}'
            self._waiting(run, reason, message, IMAGE_RETRY_SECONDS)
            return
        run.image_id = f"nodeagent://{rule.match}"
        home = self.dir / "home"
        base = {"PATH": rule.path_env(), "HOME": str(home), "HOSTNAME": self._hostname(), **rule.env}
        try:
            env = self.resolver.container_env(run.spec, base)
            mounts = self._mounts(run, rule)
        except NotReadyError as exc:
            self._waiting(run, "CreateContainerConfigError", exc.message, RETRY_SECONDS)
            return
        except ApiError as exc:
            self._waiting(run, "CreateContainerConfigError", str(exc), RETRY_SECONDS)
            return
        argv = self._argv(run, rule, env)
        if not argv:
            message = f"no command specified for container {run.name!r} (and no entrypoint for {image})"
            self._waiting(run, "CreateContainerError", message, MAX_BACKOFF_SECONDS)
            return
        self._spawn(run, argv, env, mounts, str(run.spec.get("workingDir") or rule.working_dir or home))

    def _hostname(self) -> str:
        spec = self.pod["spec"]
        return str(spec.get("hostname") or self.pod["metadata"]["name"])

    @staticmethod
    def _argv(run: ContainerRun, rule: images.ImageRule, env: dict[str, str]) -> list[str]:
        command = run.spec.get("command")
        args = run.spec.get("args")
        if command:
            argv = [*command, *(args or [])]
        else:
            argv = [*rule.entrypoint, *(args if args is not None else rule.cmd)]
        return [expand(str(a), env) for a in argv]

    def _mounts(self, run: ContainerRun, rule: images.ImageRule) -> list[JSON]:
        mounts: list[JSON] = []
        for mount in run.spec.get("volumeMounts") or []:
            name = str(mount["name"])
            if name not in self.volumes:
                raise NotReadyError("CreateContainerConfigError", f"volume {name!r} not found")
            source, read_only = self.volumes[name]
            if mount.get("subPath"):
                source = source / str(mount["subPath"])
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": str(mount["mountPath"]),
                    "readOnly": read_only or bool(mount.get("readOnly")),
                }
            )
        # The image's own files (a repo checked out under /tmp, say) stay visible even
        # when a volume covers a parent of them, as in a container with its own rootfs.
        mounts.extend({"source": keep, "target": keep, "readOnly": True} for keep in rule.keep)
        # HOME (and the default working directory) stay reachable even when a volume
        # covers a parent of the agent's state directory (an emptyDir at /tmp).
        home = str(self.dir / "home")
        mounts.append({"source": home, "target": home, "readOnly": False})
        message_path = str(run.spec.get("terminationMessagePath") or "/dev/termination-log")
        message_file = self._termination_file(run)
        message_file.write_bytes(b"")
        mounts.append({"source": str(message_file), "target": message_path, "readOnly": False})
        return mounts

    def _termination_file(self, run: ContainerRun) -> Path:
        return self.dir / "termination" / run.name

    def _log_file(self, run: ContainerRun) -> Path:
        return self.dir / f"{run.name}.log"

    def _status_file(self, run: ContainerRun) -> Path:
        return self.dir / "run" / f"{run.name}.status.json"

    def _spawn(
        self, run: ContainerRun, argv: list[str], env: dict[str, str], mounts: list[JSON], cwd: str
    ) -> None:
        spec_file = self.dir / "run" / f"{run.name}.json"
        status_file = self._status_file(run)
        status_file.unlink(missing_ok=True)
        spec = {
            "argv": argv,
            "env": env,
            "cwd": cwd,
            "mounts": mounts,
            "status": str(status_file),
            "parent": os.getpid(),
            "cgroup": self._memory_cgroup(run),
        }
        spec_file.write_text(json.dumps(spec))
        spec_file.chmod(0o600)  # holds the env, which may hold secrets
        log_path = self._log_file(run)
        with log_path.open("ab") as log_out:
            run.log_offset = log_out.tell()
            run.popen = subprocess.Popen(
                [sys.executable, str(EXEC_HELPER), str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                env={"LANG": "C.UTF-8"},
                cwd="/",
                start_new_session=True,
            )
        run.started_mono = time.monotonic()
        run.container_id = f"nodeagent://{run.popen.pid}"
        run.state = {"running": {"startedAt": now_rfc3339()}}
        log.info("pod %s: started container %s (pid %d): %s", self.key, run.name, run.popen.pid, argv)

    def _memory_cgroup(self, run: ContainerRun) -> str | None:
        """A memory cgroup for a container with a memory limit; its ``cgroup.procs`` file."""
        limit = (run.spec.get("resources", {}).get("limits") or {}).get("memory")
        if limit is None or self.ctx.cgroups is None:
            return None
        name = f"{self.uid}_{run.name}"
        try:
            run.cgroup = self.ctx.cgroups.create(name, float(parse_quantity(limit)))
        except OSError as exc:
            log.warning("pod %s: memory limit of %s not enforced: %s", self.key, run.name, exc)
            return None
        return str(run.cgroup / "cgroup.procs")

    def _record_exit(self, run: ContainerRun) -> None:
        assert run.popen is not None
        code = run.popen.wait()
        run.popen = None
        oom_kills = 0
        if run.cgroup is not None and self.ctx.cgroups is not None:
            oom_kills = self.ctx.cgroups.oom_kills(run.cgroup)
            self.ctx.cgroups.remove(run.cgroup)
            run.cgroup = None
        outcome: JSON = {}
        try:
            outcome = json.loads(self._status_file(run).read_text())
        except (OSError, ValueError):
            # The helper itself was killed (SIGKILL after the grace period).
            outcome = {"exitCode": 128 + signal.SIGKILL if code < 0 else code}
        started = str(run.state.get("running", {}).get("startedAt") or now_rfc3339())
        term: JSON = {"startedAt": started, "finishedAt": now_rfc3339(), "containerID": run.container_id}
        if "startError" in outcome:
            term.update(exitCode=128, reason="StartError", message=str(outcome["startError"]))
        else:
            exit_code = int(outcome["exitCode"])
            reason = "Completed" if exit_code == 0 else "OOMKilled" if oom_kills else "Error"
            term.update(exitCode=exit_code, reason=reason)
            if outcome.get("signal"):
                term["signal"] = int(outcome["signal"])
            message = self._termination_message(run, exit_code)
            if message:
                term["message"] = message
        run.state = {"terminated": term}
        log.info("pod %s: container %s exited: %s", self.key, run.name, term.get("exitCode"))
        if self._should_restart(run):
            ran_for = time.monotonic() - run.started_mono
            delay = 0.0 if ran_for > 600 else self.ctx.restart_backoff * 2 ** min(run.restart_count, 10)
            delay = min(delay, MAX_BACKOFF_SECONDS)
            run.last_state = {"terminated": term}
            message = f"back-off {delay:.0f}s restarting failed container={run.name} pod={self.key}"
            self._waiting(run, "CrashLoopBackOff", message, delay)
            run.restart_pending = True

    def _termination_message(self, run: ContainerRun, exit_code: int) -> str:
        try:
            with self._termination_file(run).open("rb") as f:
                message = f.read(MAX_MESSAGE_BYTES)
        except OSError:
            message = b""
        policy = run.spec.get("terminationMessagePolicy") or "File"
        if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
            with self._log_file(run).open("rb") as f:
                f.seek(run.log_offset)
                text = f.read()
            lines = text.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
            message = b"".join(lines)[-FALLBACK_LOG_BYTES:]
        return message.decode(errors="replace")

    # -- termination ---------------------------------------------------------------
    def _terminate(self, grace: float) -> None:
        """SIGTERM every running container, SIGKILL what is left after ``grace`` seconds."""
        self.terminating = True
        runs = [r for r in [*self.init_runs, *self.runs] if r.popen is not None]
        for run in runs:
            assert run.popen is not None
            log.info("pod %s: stopping container %s (grace %.0fs)", self.key, run.name, grace)
            _signal(run.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = False
        while any(r.popen is not None and r.popen.poll() is None for r in runs):
            if not killed and time.monotonic() >= deadline:
                for run in runs:
                    if run.popen is not None:
                        _signal(run.popen, signal.SIGKILL)
                killed = True
            time.sleep(0.1)
        for run in runs:
            if run.popen is not None:
                self._record_exit(run)

    def _kill_all(self) -> None:
        for run in [*self.init_runs, *self.runs]:
            if run.popen is not None and run.popen.poll() is None:
                _signal(run.popen, signal.SIGKILL)
                run.popen.wait()

    def _mark_lost(self) -> None:
        message = "The container could not be located when the pod was terminated"
        for run in [*self.init_runs, *self.runs]:
            run.state = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": message,
                    "finishedAt": now_rfc3339(),
                }
            }
        self.failure = ("ContainerStatusUnknown", "the node agent restarted while the pod was running")

    def _delete_object(self) -> None:
        meta = self.pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
        body["preconditions"] = {"uid": self.uid}
        try:
            self.ctx.kube.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s: delete: %s", self.key, exc)

    def _cleanup(self) -> None:
        for sub in ("volumes", "termination", "run", "home"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    # -- status ------------------------------------------------------------------------
    def _terminal(self) -> bool:
        return self._phase() in ("Succeeded", "Failed")

    def _phase(self) -> str:
        if self.failure is not None:
            return "Failed"
        if self.shutdown and self.terminating:
            return "Failed"
        if not self.initialized and not self.terminating:
            return "Pending"
        states = [r.state for r in self.runs]
        if any("running" in s for s in states):
            return "Running"
        if all("terminated" in s for s in states):
            ok = all(s["terminated"].get("exitCode") == 0 for s in states)
            return "Succeeded" if ok else "Failed"
        if self.terminating:
            return "Failed"  # deleted before every container ran
        ever_ran = any(r.restart_count or r.last_state for r in self.runs)
        return "Running" if ever_ran else "Pending"

    def _condition(self, kind: str, ok: bool, reason: str = "") -> JSON:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now_rfc3339())
        condition: JSON = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self._transitions[kind][1],
        }
        if reason:
            condition["reason"] = reason
        return condition

    def status(self) -> JSON:
        phase = self._phase()
        terminal = phase in ("Succeeded", "Failed")
        all_running = bool(self.runs) and all(r.running for r in self.runs)
        ready_reason = "PodCompleted" if terminal else ("" if all_running else "ContainersNotReadyError")
        conditions = [
            self._condition("PodReadyToStartContainers", self.volumes_ready and not terminal),
            self._condition(
                "Initialized", self.initialized, "" if self.initialized else "ContainersNotInitialized"
            ),
            self._condition("Ready", all_running and not terminal, ready_reason),
            self._condition("ContainersReady", all_running and not terminal, ready_reason),
            self._condition("PodScheduled", True),
        ]
        status: JSON = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": LOCAL_IP,
            "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}],
            "startTime": self.start_time,
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        if self.failure is not None:
            if self.failure[0]:
                status["reason"] = self.failure[0]
            status["message"] = self.failure[1]
        elif self.shutdown and self.terminating:
            status["reason"] = "Terminated"
            status["message"] = "Pod was terminated in response to imminent node shutdown."
        return status

    def _publish(self, *, final: bool = False) -> None:
        """Patch the pod's status if it changed since the last successful patch."""
        status = self.status()
        if status == self._last_sent or (time.monotonic() < self._retry_publish_at and not final):
            return
        meta = self.pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        body = {"metadata": {"uid": self.uid}, "status": status}
        try:
            self.ctx.kube.request("PATCH", path, body, content_type=STRATEGIC_MERGE_PATCH)
        except ApiError as exc:
            if exc.status in (404, 409):  # the pod is gone (or replaced): stop without deleting
                self.request_stop(0, delete_object=False)
            else:
                log.warning("pod %s: status: %s", self.key, exc)
                self._retry_publish_at = time.monotonic() + RETRY_SECONDS
            return
        except Exception as exc:  # the API server may be briefly unreachable; retry soon
            log.warning("pod %s: status: %s", self.key, exc)
            self._retry_publish_at = time.monotonic() + RETRY_SECONDS
            return
        self._last_sent = status


def _signal(popen: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(signum)
