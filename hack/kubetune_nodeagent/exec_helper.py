"""Start one container process for the node agent: the "container runtime".

Run as ``python exec_helper.py SPEC.json`` (standard library only, so it starts
fast and needs nothing on ``sys.path``).  It is a separate, single-threaded
process because setting up namespaces between ``fork`` and ``exec`` is not safe
from the agent's own multi-threaded process.

Steps:

1. ``PR_SET_PDEATHSIG`` = SIGKILL, so this helper dies with the agent.
2. ``unshare(CLONE_NEWNS)``, make every mount private, then bind-mount each
   volume at its mountPath (read-only ones remounted read-only).  Mount points
   that do not exist on the host are created there (empty dirs/files).
   In OCI mode (``spec["oci"]``) it mounts the container's root filesystem instead (an
   overlay of the image's layers, see :func:`setup_oci_root`), and the command it execs is
   the OCI runtime (``crun run``), which binds the volumes and applies the security context.
3. ``unshare(CLONE_NEWPID)`` and fork: the child is PID 1 of a new PID namespace,
   joins the container's memory cgroup (if it has a memory limit), gets its own
   ``/proc``, a new session, ``PR_SET_PDEATHSIG`` = SIGKILL, and execs the
   container command.  When PID 1 exits, the kernel kills every other
   process in the namespace, so no grandchild outlives its container.
4. The helper forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to PID 1
   (like a container runtime, and like PID 1 in a container a process that has no
   handler for SIGTERM ignores it), waits for it and writes the outcome to the
   spec's ``status`` file: ``{"exitCode": n, "signal": s}`` or
   ``{"startError": message}``.  Its own exit code is the container's
   (128 + signal number when the container was killed by a signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import signal
import stat
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2
HYBRID_CGROUP2 = "/sys/fs/cgroup/unified"
START_ERROR_EXIT = 128
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class StartError(Exception):
    """The container could not be started; the message is reported as the reason."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise StartError(f"{what}: {os.strerror(errno)} (errno {errno})")


def die_with_parent() -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what}) (the node agent must run as root)")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _make_mount_point(is_dir: bool, target: str) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
    if not os.path.exists(target):
        with open(target, "a"):
            pass


def setup_mounts(mounts: list[dict[str, Any]]) -> None:
    """Enter a private mount namespace and bind every volume (parents before children).

    Every source is opened (``O_PATH``) before the first mount and bound through
    ``/proc/self/fd``, so a volume mounted over a parent of another volume's
    source (the pod's emptyDir at ``/tmp`` while the agent's state is in
    ``/tmp``) cannot hide that source.
    """
    unshare(CLONE_NEWNS, "CLONE_NEWNS")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    opened: list[tuple[int, bool, dict[str, Any]]] = []
    for entry in sorted(mounts, key=lambda m: len(Path(m["target"]).parts)):
        try:
            fd = os.open(str(entry["source"]), os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise StartError(f"cannot open volume source {entry['source']}: {exc}") from exc
        opened.append((fd, stat.S_ISDIR(os.fstat(fd).st_mode), entry))
    for fd, is_dir, entry in opened:
        target = str(entry["target"])
        try:
            _make_mount_point(is_dir, target)
        except OSError as exc:
            raise StartError(f"cannot create mount point {target}: {exc}") from exc
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        if entry.get("readOnly"):
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        os.close(fd)


def setup_oci_root(oci: dict[str, Any]) -> None:
    """OCI mode: a private mount namespace holding the container's root filesystem.

    The image's layers (read-only, shared by every container of the image) are the lower
    layers of an overlay whose upper layer is this container's own, so the runtime can create
    mount points and, unless ``readOnlyRootFilesystem``, the container can write; the runtime
    (started next, in this namespace) binds the volumes and remounts the root read-only. The
    overlay exists only in this namespace: it goes away with the container, whatever kills it.
    """
    unshare(CLONE_NEWNS, "CLONE_NEWNS")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # crun refuses a hybrid cgroup host whose cgroup2 mount has controllers (hugetlb, here),
    # even with --cgroup-manager=disabled; it uses no cgroup at all, so hide that mount from it.
    if os.path.ismount(HYBRID_CGROUP2):
        _check(_libc.umount2(HYBRID_CGROUP2.encode(), MNT_DETACH), f"umount {HYBRID_CGROUP2}")
    for key in ("rootfs", "upper", "work"):
        try:
            os.makedirs(oci[key], exist_ok=True)
        except OSError as exc:
            raise StartError(f"cannot create {oci[key]}: {exc}") from exc
    lower = ":".join(str(layer) for layer in oci["layers"])
    options = f"lowerdir={lower},upperdir={oci['upper']},workdir={oci['work']}"
    mount("overlay", str(oci["rootfs"]), "overlay", 0, options)


def _exec_child(spec: dict[str, Any], errors: int, helper_alive: int) -> None:
    """In the forked child (PID 1 of the new namespace): never returns."""
    try:
        die_with_parent()
        # If the helper died before PDEATHSIG was armed, its end of the pipe is closed.
        if select.select([helper_alive], [], [], 0)[0]:
            os._exit(1)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if spec.get("cgroup"):  # the memory limit applies from here on, not to the helper
            try:
                Path(spec["cgroup"]).write_text("0")
            except OSError as exc:
                raise StartError(f"cannot join memory cgroup {spec['cgroup']}: {exc}") from exc
        # A /proc that shows only this container's processes; harmless if it fails.
        with contextlib.suppress(StartError):
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.setsid()
        if spec.get("cwd"):
            try:
                os.makedirs(spec["cwd"], exist_ok=True)
                os.chdir(spec["cwd"])
            except OSError as exc:
                raise StartError(f"cannot enter workingDir {spec['cwd']}: {exc}") from exc
        argv = [str(a) for a in spec["argv"]]
        try:
            os.execvpe(argv[0], argv, dict(spec["env"]))  # noqa: S606 (a container runs its argv)
        except OSError as exc:
            raise StartError(f'exec: "{argv[0]}": {exc.strerror}') from exc
    except BaseException as exc:  # any failure before exec is a start error
        os.write(errors, str(exc).encode()[:4000] or b"start failed")
    os._exit(START_ERROR_EXIT)


def _runtime_errors(log_path: str) -> str:
    """The OCI runtime's own errors (``crun --log-format=json``): the container never ran."""
    errors = []
    with contextlib.suppress(OSError):
        for line in Path(log_path).read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") == "error":
                    errors.append(str(entry.get("msg", "")))
    return "; ".join(errors)


class StatusFile:
    """The outcome file; its directory is opened before any mount can cover it."""

    def __init__(self, path: str) -> None:
        self.name = os.path.basename(path)
        self.dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def write(self, status: dict[str, Any]) -> None:
        tmp = f".{self.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(status))
        os.replace(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)


def run(spec: dict[str, Any]) -> int:
    die_with_parent()
    if os.getppid() != int(spec["parent"]):
        return 1  # the agent is already gone
    child_pid = 0
    pending: list[int] = []
    status_file = StatusFile(str(spec["status"]))

    def forward(signum: int, _frame: object) -> None:
        if child_pid:
            os.kill(child_pid, signum)
        else:
            pending.append(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        if spec.get("oci"):
            setup_oci_root(dict(spec["oci"]))
        else:
            setup_mounts(list(spec["mounts"]))
        unshare(CLONE_NEWPID, "CLONE_NEWPID")
    except StartError as exc:
        status_file.write({"startError": str(exc)})
        return START_ERROR_EXIT
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(errors_r)
        os.close(alive_w)
        _exec_child(spec, errors_w, alive_r)
    os.close(errors_w)
    os.close(alive_r)
    child_pid = pid
    for signum in pending:
        os.kill(child_pid, signum)
    message = b""
    while chunk := os.read(errors_r, 4096):
        message += chunk
    _, status = os.waitpid(pid, 0)
    if not message and spec.get("oci"):
        message = _runtime_errors(str(spec["oci"].get("log") or "")).encode()
    if message:
        status_file.write({"startError": message.decode(errors="replace")})
        return START_ERROR_EXIT
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        status_file.write({"exitCode": 128 + signum, "signal": signum})
        return 128 + signum
    code = os.waitstatus_to_exitcode(status)
    status_file.write({"exitCode": code})
    return code


def probe() -> int:
    """Check that this machine lets us create mount and PID namespaces."""
    try:
        unshare(CLONE_NEWNS, "CLONE_NEWNS")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        unshare(CLONE_NEWPID, "CLONE_NEWPID")
    except StartError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def main() -> None:
    if sys.argv[1:] == ["--probe"]:
        sys.exit(probe())
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.exit(run(spec))


if __name__ == "__main__":
    main()
