"""The node agent's image table: which local environment stands in for which image.

The table is a YAML (or JSON) file, by default ``hack/images.yaml``::

    images:
      - match: ghcr.io/kubetune/trainer   # repository; fnmatch patterns allowed ("ghcr.io/kubetune/*", "*")
        path: [../.venv/bin]              # prepended to PATH; relative paths are relative to the table file
        keep: [..]                        # the "image's files": host folders that stay visible (read-only)
                                          # even under a volume mounted over a parent (an emptyDir at /tmp)
        env: {PYTHONUNBUFFERED: "1"}      # the image's ENV (the pod's env overrides it)
        entrypoint: [python, -m, kubetune_trainer]   # the image's ENTRYPOINT (optional)
        cmd: []                                      # the image's CMD (optional)
        workingDir: /tmp                             # the image's WORKDIR (optional)

Images are compared by repository, normalised like Docker does (``busybox:1.36``
is ``docker.io/library/busybox``; tag and digest are ignored).  The first
matching rule wins.  An image that no rule matches cannot be "pulled": its
container waits with reason ErrImagePull / ImagePullBackOff.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TABLE = Path(__file__).resolve().parent.parent / "images.yaml"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def normalize(image: str) -> str:
    """The repository part of an image reference, with Docker's default registry filled in."""
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    if ":" in name[last_slash + 1 :]:
        name = name[: name.rfind(":")]
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


@dataclass(frozen=True)
class ImageRule:
    """How to run containers of the images matching ``match``."""

    match: str
    path: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str | None = None
    keep: tuple[str, ...] = ()

    def matches(self, image: str) -> bool:
        pattern = self.match if any(c in self.match for c in "*?[") else normalize(self.match)
        return fnmatch.fnmatchcase(normalize(image), pattern)

    def path_env(self) -> str:
        return ":".join([*self.path, BASE_PATH])


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(str(v) for v in value)


def load_table(path: Path) -> list[ImageRule]:
    data = yaml.safe_load(path.read_text()) or {}
    rules: list[ImageRule] = []
    for i, entry in enumerate(data.get("images") or []):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not entry.get("match"):
            raise ValueError(f"{where}: each rule needs a 'match'")
        dirs = tuple(str((path.parent / p).resolve()) for p in _strings(entry.get("path"), f"{where}.path"))
        keep = tuple(str((path.parent / p).resolve()) for p in _strings(entry.get("keep"), f"{where}.keep"))
        rules.append(
            ImageRule(
                match=str(entry["match"]),
                path=dirs,
                env={str(k): str(v) for k, v in (entry.get("env") or {}).items()},
                entrypoint=_strings(entry.get("entrypoint"), f"{where}.entrypoint"),
                cmd=_strings(entry.get("cmd"), f"{where}.cmd"),
                working_dir=str(entry["workingDir"]) if entry.get("workingDir") else None,
                keep=keep,
            )
        )
    return rules


def resolve(table: list[ImageRule], image: str) -> ImageRule | None:
    return next((rule for rule in table if rule.matches(image)), None)
