"""The processes of a pod's containers: start one through the exec helper, stop them, and read
how each ended (exit code, OOM kill, termination message).

The helper (:mod:`.exec_helper`) runs as its own single-threaded process and sets up the
container's namespaces and mounts; this module only starts it, signals it and reads the status
file it leaves.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.status import rfc3339

from .cgroup import MemoryCgroups
from .imagestore import ImageStore
from .mounts import PodDir
from .scheduling import parse_quantity

JSON = dict[str, Any]
EXEC_HELPER = Path(__file__).resolve().with_name("exec_helper.py")
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_BYTES = 2048
FALLBACK_LOG_LINES = 80

log = logging.getLogger("nodeagent")


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

    def wait(self, reason: str, message: str, retry: float) -> None:
        """Waiting with a reason; the next start is tried after ``retry`` seconds."""
        self.state = {"waiting": {"reason": reason, "message": message}}
        self.next_start = time.monotonic() + retry

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


def attach_memory_cgroup(run: ContainerRun, pod_dir: PodDir, cgroups: MemoryCgroups | None) -> str | None:
    """A memory cgroup for a container with a memory limit; its ``cgroup.procs`` file."""
    limit = (run.spec.get("resources", {}).get("limits") or {}).get("memory")
    if limit is None or cgroups is None:
        return None
    try:
        run.cgroup = cgroups.create(f"{pod_dir.uid}_{run.name}", float(parse_quantity(limit)))
    except OSError as exc:
        log.warning("pod %s: memory limit of %s not enforced: %s", pod_dir.root.name, run.name, exc)
        return None
    return str(run.cgroup / "cgroup.procs")


def spawn(
    run: ContainerRun,
    pod_dir: PodDir,
    argv: list[str],
    env: dict[str, str],
    *,
    mounts: list[JSON],
    cwd: str,
    cgroup_procs: str | None,
    oci: JSON | None = None,
) -> None:
    """Start the container through the exec helper; its output goes to the container's log."""
    spec_file, status_file = pod_dir.spec_file(run.name), pod_dir.status_file(run.name)
    status_file.unlink(missing_ok=True)
    spec = {
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "mounts": mounts,
        "status": str(status_file),
        "parent": os.getpid(),
        "cgroup": cgroup_procs,
        "oci": oci,
    }
    spec_file.write_text(json.dumps(spec))
    spec_file.chmod(0o600)  # holds the env, which may hold secrets
    with pod_dir.log_file(run.name).open("ab") as log_out:
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
    run.state = {"running": {"startedAt": rfc3339()}}


@dataclass(frozen=True)
class OciRuntime:
    """The agent's OCI mode: the image store and the runtime that runs containers from it."""

    store: ImageStore
    runtime: str
    state_dir: Path
    seccomp_root: Path


def oci_bundle(
    run: ContainerRun, pod_dir: PodDir, rt: OciRuntime, config: JSON, layers: tuple[str, ...]
) -> tuple[list[str], JSON]:
    """Write the container's OCI bundle; the helper's argv (``crun run``) and its ``oci`` spec.

    A fresh upper layer per start, as a new container gets on a real node; the runtime's state
    is in the agent's state directory, and a leftover of a killed earlier start is deleted first.
    """
    bundle = pod_dir.root / "run" / f"{run.name}.oci"
    for stale in ("upper", "work"):
        shutil.rmtree(bundle / stale, ignore_errors=True)
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config))
    (bundle / "config.json").chmod(0o600)  # holds the env, which may hold secrets
    (bundle / "runtime.log").unlink(missing_ok=True)
    container_id = f"{pod_dir.uid}-{run.name}"
    if (rt.state_dir / container_id).exists():
        subprocess.run(
            [rt.runtime, "--root", str(rt.state_dir), "delete", "--force", container_id],
            capture_output=True,
            check=False,
        )
    argv = [
        rt.runtime, "--root", str(rt.state_dir), "--cgroup-manager=disabled",
        f"--log={bundle / 'runtime.log'}", "--log-format=json",
        "run", "--bundle", str(bundle), "--no-new-keyring", container_id,
    ]  # fmt: skip
    spec = {
        "rootfs": str(bundle / "rootfs"),
        "upper": str(bundle / "upper"),
        "work": str(bundle / "work"),
        "layers": list(layers),
        "log": str(bundle / "runtime.log"),
    }
    return argv, spec


def collect_exit(run: ContainerRun, pod_dir: PodDir, cgroups: MemoryCgroups | None) -> JSON:
    """Reap the container's process and return its ``terminated`` state."""
    assert run.popen is not None
    code = run.popen.wait()
    run.popen = None
    oom_kills = 0
    if run.cgroup is not None and cgroups is not None:
        oom_kills = cgroups.oom_kills(run.cgroup)
        cgroups.remove(run.cgroup)
        run.cgroup = None
    try:
        outcome: JSON = json.loads(pod_dir.status_file(run.name).read_text())
    except (OSError, ValueError):
        # The helper itself was killed (SIGKILL after the grace period).
        outcome = {"exitCode": 128 + signal.SIGKILL if code < 0 else code}
    started = str(run.state.get("running", {}).get("startedAt") or rfc3339())
    term: JSON = {"startedAt": started, "finishedAt": rfc3339(), "containerID": run.container_id}
    if "startError" in outcome:
        term.update(exitCode=128, reason="StartError", message=str(outcome["startError"]))
        return term
    exit_code = int(outcome["exitCode"])
    term.update(
        exitCode=exit_code, reason="Completed" if exit_code == 0 else "OOMKilled" if oom_kills else "Error"
    )
    if outcome.get("signal"):
        term["signal"] = int(outcome["signal"])
    message = termination_message(run, pod_dir, exit_code)
    if message:
        term["message"] = message
    return term


def termination_message(run: ContainerRun, pod_dir: PodDir, exit_code: int) -> str:
    """The termination message file, or the log's tail (FallbackToLogsOnError after a failure)."""
    try:
        with pod_dir.termination_file(run.name).open("rb") as f:
            message = f.read(MAX_MESSAGE_BYTES)
    except OSError:
        message = b""
    policy = run.spec.get("terminationMessagePolicy") or "File"
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        with pod_dir.log_file(run.name).open("rb") as f:
            f.seek(run.log_offset)
            text = f.read()
        lines = text.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        message = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode(errors="replace")


def stop(runs: list[ContainerRun], grace: float, key: str) -> None:
    """SIGTERM every running container, SIGKILL what is left after ``grace`` seconds; wait for all."""
    live = [r for r in runs if r.popen is not None]
    for run in live:
        assert run.popen is not None
        log.info("pod %s: stopping container %s (grace %.0fs)", key, run.name, grace)
        send_signal(run.popen, signal.SIGTERM)
    deadline = time.monotonic() + grace
    killed = False
    while any(r.popen is not None and r.popen.poll() is None for r in live):
        if not killed and time.monotonic() >= deadline:
            for run in live:
                if run.popen is not None:
                    send_signal(run.popen, signal.SIGKILL)
            killed = True
        time.sleep(0.1)


def kill(run: ContainerRun) -> None:
    if run.popen is not None and run.popen.poll() is None:
        send_signal(run.popen, signal.SIGKILL)
        run.popen.wait()


def send_signal(popen: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(signum)
