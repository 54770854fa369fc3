"""A pod's directory on the node, and the mounts each of its containers gets.

Layout of ``<state>/pods/<namespace>_<pod>/``: ``<container>.log`` (stdout+stderr, kept after
the pod is gone), ``volumes/``, ``termination/<container>`` (bind-mounted at
terminationMessagePath), ``run/`` (helper specs and exit statuses) and ``home/`` (HOME and the
default working directory). Everything but the logs is removed when the pod is deleted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import ImageRule
from .podspec import NotReadyError

JSON = dict[str, Any]
_SCRATCH = ("run", "termination", "home", "volumes")
#: Kubernetes' default terminationMessagePath (what the kubelet uses when a container sets none).
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_NO_RULE = ImageRule(match="")


@dataclass(frozen=True)
class PodDir:
    """The files of one pod (by uid) under the agent's state directory."""

    root: Path
    uid: str

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def log_file(self, container: str) -> Path:
        return self.root / f"{container}.log"

    def spec_file(self, container: str) -> Path:
        return self.root / "run" / f"{container}.json"

    def status_file(self, container: str) -> Path:
        return self.root / "run" / f"{container}.status.json"

    def termination_file(self, container: str) -> Path:
        return self.root / "termination" / container

    def prepare(self) -> None:
        """Create the folders; a folder left by an older pod of the same name is moved aside."""
        uid_file = self.root / "uid"
        if self.root.exists() and uid_file.exists() and uid_file.read_text() != self.uid:
            old = self.root.with_name(f"{self.root.name}.{uid_file.read_text()[:8]}")
            shutil.rmtree(old, ignore_errors=True)
            self.root.rename(old)
        for sub in _SCRATCH:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        uid_file.write_text(self.uid)

    def cleanup(self) -> None:
        """Remove everything but the logs."""
        for sub in _SCRATCH:
            shutil.rmtree(self.root / sub, ignore_errors=True)


def container_mounts(
    container: JSON, volumes: dict[str, tuple[Path, bool]], rule: ImageRule, pod_dir: PodDir
) -> list[JSON]:
    """Bind mounts (source, target, readOnly) for one container, in mount order."""
    mounts: list[JSON] = []
    for mount in container.get("volumeMounts") or []:
        name = str(mount["name"])
        if name not in volumes:
            raise NotReadyError("CreateContainerConfigError", f"volume {name!r} not found")
        source, read_only = volumes[name]
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
    home = str(pod_dir.home)
    mounts.append({"source": home, "target": home, "readOnly": False})
    message_path = str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
    message_file = pod_dir.termination_file(str(container["name"]))
    message_file.write_bytes(b"")
    mounts.append({"source": str(message_file), "target": message_path, "readOnly": False})
    return mounts


def oci_mounts(
    container: JSON, volumes: dict[str, tuple[Path, bool]], pod_dir: PodDir, hostname: str
) -> list[JSON]:
    """OCI mode: the container's volume binds, its termination file and the kubelet-managed
    ``/etc/hosts`` and ``/etc/hostname`` (the image's root filesystem is the rest)."""
    mounts = [
        m for m in container_mounts(container, volumes, _NO_RULE, pod_dir) if m["source"] != str(pod_dir.home)
    ]
    etc = pod_dir.root / "run" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\t{hostname}\n"
    )
    (etc / "hostname").write_text(f"{hostname}\n")
    targets = {m["target"] for m in mounts}
    for name in ("hosts", "hostname"):
        if f"/etc/{name}" not in targets:
            mounts.append({"source": str(etc / name), "target": f"/etc/{name}", "readOnly": False})
    return mounts


def set_volume_ownership(
    volumes: dict[str, tuple[Path, bool]], pod_dir: PodDir, fs_group: int | None
) -> None:
    """What the kubelet does to the pod's own volumes (not hostPath): an emptyDir is mode 0777;
    with ``fsGroup`` every file gets that group, read (and for writable volumes write) access
    for it, and directories the setgid bit, so files created later keep the group."""
    for source, read_only in volumes.values():
        if not source.is_relative_to(pod_dir.volumes):
            continue
        if not read_only:
            source.chmod(0o777)
        if fs_group is None:
            continue
        mask = 0o440 if read_only else 0o660
        for path in [source, *source.rglob("*")]:
            if path.is_symlink():
                continue
            os.chown(path, -1, fs_group)
            mode = path.stat().st_mode & 0o7777
            path.chmod(mode | mask | (0o2110 if path.is_dir() else 0))


def chown_termination_file(container: JSON, pod_dir: PodDir, uid: int) -> None:
    """The kubelet gives the termination message file to the container's user."""
    os.chown(pod_dir.termination_file(str(container["name"])), uid, -1)
