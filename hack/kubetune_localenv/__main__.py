"""``python -m kubetune_localenv {build,up,down,status,serve}``: the local control plane CLI.

``up`` starts a detached supervisor (``serve``) that owns every component and
returns once they are ready; ``down`` stops the supervisor, whose children die
with it (they carry PR_SET_PDEATHSIG), and checks nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import tools
from .cluster import LaunchError, LocalEnv, log, pid_alive

DEFAULT_STATE = Path(".kubetune")
SUPERVISOR_PID = "supervisor.pid"
READY_FILE = "ready"


def _read_pid(state: Path) -> int | None:
    """The supervisor's PID, if that process is still our supervisor (a PID file can outlive
    its process, and after a reboot the number may belong to something else)."""
    try:
        pid = int((state / SUPERVISOR_PID).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError):
        return None
    ours = b"kubetune_localenv" in cmdline and str(state.resolve()).encode() in cmdline
    return pid if ours else None


def cmd_serve(state: Path, with_agent: bool, with_kueue: bool = False) -> int:
    """Run every component in the foreground until SIGTERM/SIGINT."""
    env = LocalEnv(state.resolve())
    if with_agent:
        from .agents import start_agent  # the node agent runs the pods

        env.extra_start.append(start_agent)
    if with_kueue:
        from .kueue import start_kueue  # admits Jobs labelled kueue.x-k8s.io/queue-name

        env.extra_start.append(start_kueue)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        env.start()
    except (LaunchError, tools.ToolBuildError) as err:
        log(f"error: {err}")
        return 1
    (state / READY_FILE).write_text(json.dumps(env.env()))
    try:
        while not stop.wait(1.0):
            dead = [p.name for p in env.processes if not p.alive()]
            if dead:
                log(f"error: {', '.join(dead)} exited; see {env.logs_dir}")
                return 1
    finally:
        (state / READY_FILE).unlink(missing_ok=True)
        env.stop()
    return 0


def cmd_up(state: Path, with_agent: bool, timeout: float, with_kueue: bool = False) -> int:
    pid = _read_pid(state)
    if pid and pid_alive(pid):
        if (state / READY_FILE).exists():
            log(f"already running (supervisor pid {pid}); kubeconfig: {state / 'kubeconfig'}")
            return 0
        log(f"error: a control plane is still starting in {state} (supervisor pid {pid});")
        log("wait for it, or stop it with: make cluster-down")
        return 1
    state.mkdir(parents=True, exist_ok=True)
    (state / READY_FILE).unlink(missing_ok=True)
    # Build in the foreground so build errors reach the terminal directly.
    try:
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "versitygw"]
        tools.build_all(names + (["kueue"] if with_kueue else []))
    except tools.ToolBuildError as err:
        log(f"error: {err}")
        return 1
    supervisor_log = (state / "logs").resolve()
    supervisor_log.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kubetune_localenv", "serve", "--state", str(state.resolve())]
    if not with_agent:
        argv.append("--no-agent")
    if with_kueue:
        argv.append("--with-kueue")
    with (supervisor_log / "supervisor.log").open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    (state / SUPERVISOR_PID).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state / READY_FILE).exists():
            log(f"control plane up (supervisor pid {proc.pid})")
            log(f"kubeconfig: {state / 'kubeconfig'}   S3 settings: {state / 's3.env'}")
            log(f"logs: {supervisor_log}/")
            return 0
        if proc.poll() is not None:
            tail = (supervisor_log / "supervisor.log").read_text(errors="replace").splitlines()[-30:]
            log("error: the control plane failed to start:\n" + "\n".join(tail))
            return 1
        time.sleep(0.3)
    log(f"error: not ready after {timeout:.0f}s; see {supervisor_log}")
    proc.terminate()
    return 1


def cmd_down(state: Path, timeout: float = 30.0) -> int:
    pid = _read_pid(state)
    if pid is None or not pid_alive(pid):
        log("not running")
        (state / SUPERVISOR_PID).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)  # children still die: they carry PDEATHSIG
    # The components die with the supervisor; make sure none is left.
    leftovers = _component_pids(state)
    deadline = time.monotonic() + 10
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [p for p in leftovers if pid_alive(p)]
    for leftover in leftovers:
        os.kill(leftover, signal.SIGKILL)
    (state / SUPERVISOR_PID).unlink(missing_ok=True)
    log("control plane stopped")
    return 0


def _component_pids(state: Path) -> list[int]:
    """PIDs from state.json that are still the components started for ``state``."""
    try:
        data = json.loads((state / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    found = []
    for pid in (int(p) for p in data.get("pids", {}).values() if p):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if str(state.resolve()).encode() in cmdline and pid_alive(pid):
            found.append(pid)
    return found


def cmd_status(state: Path) -> int:
    pid = _read_pid(state)
    if pid and pid_alive(pid) and (state / READY_FILE).exists():
        print((state / "state.json").read_text())
        return 0
    log("not running")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_localenv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build pinned Go tools into the cache (default: all)")
    build.add_argument("names", nargs="*", metavar="TOOL", help=", ".join(tools.TOOLS))
    for name in ("up", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--state", type=Path, default=DEFAULT_STATE)
        p.add_argument("--no-agent", action="store_true", help="do not start the node agent")
        p.add_argument("--with-kueue", action="store_true", help="also start Kueue (batch/job integration)")
        if name == "up":
            p.add_argument("--timeout", type=float, default=1800.0)
    for name in ("down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    if args.command == "build":
        unknown = sorted(set(args.names) - set(tools.TOOLS))
        if unknown:
            parser.error(f"unknown tool {', '.join(unknown)} (known: {', '.join(tools.TOOLS)})")
        return tools.main(args.names)
    if args.command == "up":
        return cmd_up(args.state, not args.no_agent, args.timeout, args.with_kueue)
    if args.command == "serve":
        return cmd_serve(args.state, not args.no_agent, args.with_kueue)
    if args.command == "down":
        return cmd_down(args.state)
    return cmd_status(args.state)


if __name__ == "__main__":
    raise SystemExit(main())
