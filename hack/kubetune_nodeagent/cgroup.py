"""Memory limits for the node agent's containers, through memory cgroups.

Each container with ``resources.limits.memory`` gets its own cgroup below the
agent's memory cgroup; the container's PID 1 moves itself into it before exec
(so the exec helper's own memory is not charged).  The cgroup's OOM-kill counter
tells an ``OOMKilled`` container from one that merely exited with 137.

Works with cgroup v1 (a ``memory`` hierarchy) and with cgroup v2 when the
agent's cgroup already delegates the memory controller to its children
(``cgroup.subtree_control`` lists ``memory``).  Elsewhere limits are not enforced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nodeagent")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryCgroups:
    """Creates per-container memory cgroups under ``base``."""

    base: Path
    v2: bool

    @classmethod
    def detect(cls, name: str) -> MemoryCgroups | None:
        """Memory cgroups in a ``name`` folder below this process's cgroup, if the host has them.

        Changes nothing; :meth:`prepare` creates the folder.
        """
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                found = cls(CGROUP_ROOT / "memory" / path.lstrip("/") / name, v2=False)
                return found if os.access(found.base.parent, os.W_OK) else None
        for line in lines:
            if line.startswith("0::"):
                own = CGROUP_ROOT / line[3:].lstrip("/")
                try:
                    delegated = "memory" in (own / "cgroup.subtree_control").read_text().split()
                except OSError:
                    return None
                return cls(own / name, v2=True) if delegated and os.access(own, os.W_OK) else None
        return None

    def prepare(self) -> bool:
        """Create the folder (removing unused cgroups of an earlier run); False if that fails."""
        try:
            self.base.mkdir(exist_ok=True)
            if self.v2:
                (self.base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            log.warning("memory limits disabled: cannot create %s: %s", self.base, exc)
            return False
        for stale in self.base.iterdir():
            if stale.is_dir():
                with contextlib.suppress(OSError):
                    stale.rmdir()
        log.info("memory limits enforced with cgroups under %s", self.base)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.base.rmdir()

    def create(self, name: str, limit_bytes: float) -> Path:
        """A fresh cgroup limited to ``limit_bytes``; returns its directory."""
        path = self.base / name
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()
        path.mkdir()
        limit = str(math.ceil(limit_bytes))
        if self.v2:
            (path / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):  # only when swap accounting is on
                (path / "memory.memsw.limit_in_bytes").write_text(limit)
        return path

    def oom_kills(self, path: Path) -> int:
        events = path / ("memory.events" if self.v2 else "memory.oom_control")
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    @staticmethod
    def remove(path: Path) -> None:
        # The processes are gone, but the kernel may need a moment to release the cgroup.
        for _ in range(20):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        log.warning("could not remove cgroup %s", path)
