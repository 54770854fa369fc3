"""A pod's directory on the node, and the mounts each of its containers gets.

Layout of ``<state>/pods/<namespace>_<pod>/``: ``<container>.log`` (stdout+stderr, kept after
the pod is gone), ``volumes/``, ``termination/<container>`` (bind-mounted at
terminationMessagePath), ``run/`` (helper specs and exit statuses) and ``home/`` (HOME and the
default working directory). Everything but the logs is removed when the pod is deleted.
"""

from __future__ import annotations

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
