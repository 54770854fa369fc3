"""Images for the agent's OCI mode, read from the containers-storage store that ``make images`` fills.

``make images`` (buildah, ``hack/build-images.sh``) leaves the images in a containers-storage
directory (``~/.cache/kubetune/images/buildah-<version>-<driver>/root``). The agent reads it
directly, without buildah: ``<driver>-images/images.json`` names each image and its top layer,
the image's config (ENTRYPOINT, CMD, ENV, USER, WORKDIR) is its ``sha256:<id>`` big-data file, and
``<driver>-layers/layers.json`` chains the layers. With the overlay driver each layer is a ``diff``
directory; a container's root filesystem is those directories as overlay lower layers (mounted
by the exec helper in the container's own mount namespace). With vfs each layer directory is
already the complete tree. Nothing is pulled: a reference not in the store is ErrImagePull.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import normalize

JSON = dict[str, Any]


@dataclass(frozen=True)
class StoredImage:
    """One image of the store: its id, config and root filesystem layers (top first)."""

    id: str
    name: str
    layers: tuple[str, ...]
    driver: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = ""

    def find_file(self, path: str) -> Path | None:
        """``path`` (absolute, inside the image) in the topmost layer that has it."""
        for layer in self.layers:
            candidate = Path(layer) / path.lstrip("/")
            if candidate.exists() or candidate.is_symlink():
                return candidate
        return None


def _big_data_name(key: str) -> str:
    """containers-storage's file name for an image's big-data ``key`` (base64 unless plain)."""
    plain = all(c == "." or c.isdigit() or "a" <= c <= "z" for c in key)
    return key if plain else "=" + base64.b64encode(key.encode()).decode()


def _split_env(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _ref_variants(reference: str) -> set[str]:
    """The names an image reference may be stored under (tag defaults to latest)."""
    name = normalize(reference)
    if "@" in reference:
        return {f"{name}@{reference.split('@', 1)[1]}"}
    tail = reference.split("@", 1)[0].rsplit("/", 1)[-1]
    tag = tail.split(":", 1)[1] if ":" in tail else "latest"
    variants = {f"{name}:{tag}"}
    if name.startswith("docker.io/library/"):
        variants.add(f"{name.removeprefix('docker.io/library/')}:{tag}")
    return variants


@dataclass(frozen=True)
class ImageStore:
    """A containers-storage directory (``--root`` of buildah), read-only."""

    root: Path
    driver: str = "overlay"

    def _entries(self, kind: str) -> list[JSON]:
        path = self.root / f"{self.driver}-{kind}" / f"{kind}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def _layer_dirs(self, top: str) -> tuple[str, ...]:
        parents = {str(e["id"]): e.get("parent") for e in self._entries("layers")}
        chain: list[str] = []
        layer: str | None = top
        while layer:
            if self.driver == "vfs":  # every vfs layer is a full copy: the top one is the tree
                return (str(self.root / "vfs" / "dir" / layer),)
            chain.append(str(self.root / self.driver / layer / "diff"))
            layer = parents.get(layer)
        return tuple(chain)

    def lookup(self, reference: str) -> StoredImage | None:
        """The stored image a pod's ``image`` names, or None (not "pulled")."""
        wanted = _ref_variants(reference)
        bare = reference.removeprefix("sha256:")
        for entry in self._entries("images"):
            names = set(entry.get("names") or [])
            if not (names & wanted or (len(bare) >= 12 and str(entry["id"]).startswith(bare))):
                continue
            image_id = str(entry["id"])
            blob = self.root / f"{self.driver}-images" / image_id / _big_data_name(f"sha256:{image_id}")
            config: JSON = json.loads(blob.read_text()).get("config") or {}
            return StoredImage(
                id=image_id,
                name=sorted(names)[0] if names else image_id,
                layers=self._layer_dirs(str(entry["layer"])),
                driver=self.driver,
                entrypoint=tuple(config.get("Entrypoint") or ()),
                cmd=tuple(config.get("Cmd") or ()),
                env=_split_env(config.get("Env")),
                user=str(config.get("User") or ""),
                working_dir=str(config.get("WorkingDir") or ""),
            )
        return None
