"""spec.model.cache: s3:// base models kept on a PersistentVolumeClaim, reused by later pods.

An entry is the folder ``<cache>/<key>/``, where the key is a hash of the model's source and of
the listing of its objects (key, size, ETag): a model rewritten in object storage gets a new key,
so a stale copy is never read. An entry is written under a ``.partial-`` name and renamed into
place once every file is down and its sizes match the listing, with a marker holding the
listing; so a pod killed mid-download leaves no entry, only a partial folder that the next
download removes. Before use, the marker and every file's size are checked against the listing
again (a file that is missing or truncated on the volume means a fresh download).

Pods of several nodes may share a ReadWriteMany claim: the download of one key holds an
exclusive ``flock`` on ``<cache>/.lock-<key>``, so a second pod waits and then reads the entry.
Eviction (model.cache.maxSize) removes least recently used entries (by their marker's mtime,
touched on every use) other than the one being used, under the cache-wide lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_api.spec import split_s3_uri

from .errors import ObjectAccessError
from .storage import ObjectStore

log = logging.getLogger(__name__)

#: The marker of a complete entry: the listing it was downloaded from.
MARKER = ".kubetune-model.json"
PARTIAL_PREFIX = ".partial-"
LOCK_PREFIX = ".lock-"
#: The cache-wide lock eviction holds (a download of another key may run meanwhile).
EVICTION_LOCK = ".lock-eviction"

Listing = list[tuple[str, int, str]]


def listing(store: ObjectStore, source: str) -> Listing:
    """The model's objects as ``(path relative to the folder, size, ETag)``, sorted."""
    _, prefix = split_s3_uri(source)
    folder = prefix.rstrip("/") + "/" if prefix else ""
    found = sorted(
        (key[len(folder) :], size, etag)
        for key, size, etag in store.list_objects(source)
        if key[len(folder) :] and not key.endswith("/")
    )
    if not found:
        raise ObjectAccessError(source, "no objects under this prefix")
    return found


def entry_key(source: str, objects: Listing) -> str:
    """The cache key: the source and every object's path, size and ETag."""
    digest = hashlib.sha256(json.dumps([source.rstrip("/"), objects]).encode())
    return digest.hexdigest()[:32]


def problem(entry: Path, source: str, objects: Listing) -> str | None:
    """Why ``entry`` cannot be used for ``objects`` (None: it can)."""
    marker = entry / MARKER
    if not marker.is_file():
        return "not cached"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable marker ({err})"
    if recorded.get("source") != source or [tuple(o) for o in recorded.get("objects", [])] != objects:
        return "cached from another listing"
    return size_problem(entry, objects)


def size_problem(folder: Path, objects: Listing) -> str | None:
    """The first listed file that is missing from ``folder`` or has another size (None: none)."""
    for path, size, _ in objects:
        file = folder / path
        if not file.is_file():
            return f"{path} is missing"
        if file.stat().st_size != size:
            return f"{path} has {file.stat().st_size} bytes, the object {size}"
    return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing), released on exit."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def evict(cache: Path, max_bytes: int, incoming: int, keep: str) -> list[str]:
    """Remove least recently used entries (never ``keep``) until the others plus ``incoming``
    bytes fit ``max_bytes``; returns the removed keys."""
    entries = [e for e in cache.iterdir() if e.is_dir() and (e / MARKER).is_file() and e.name != keep]
    entries.sort(key=lambda e: (e / MARKER).stat().st_mtime)
    sizes = {e.name: entry_bytes(e) for e in entries}
    total = sum(sizes.values()) + incoming
    removed: list[str] = []
    for entry in entries:
        if total <= max_bytes:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry.name]
        removed.append(entry.name)
    return removed


def _download(store: ObjectStore, source: str, objects: Listing, cache: Path, key: str) -> Path:
    """Download into a partial folder, check the sizes, write the marker, rename into place."""
    for stale in cache.glob(f"{PARTIAL_PREFIX}{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a pod killed mid-download (we hold the key's lock)
    partial = cache / f"{PARTIAL_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
    bucket, prefix = split_s3_uri(source)
    folder = prefix.rstrip("/") + "/" if prefix else ""
    store.download_many([(f"s3://{bucket}/{folder}{path}", partial / path) for path, _, _ in objects])
    marker: dict[str, Any] = {"source": source, "objects": objects}
    trouble = size_problem(partial, objects)
    if trouble is not None:
        shutil.rmtree(partial, ignore_errors=True)
        raise ObjectAccessError(source, f"the model changed while it was downloaded ({trouble}): retry")
    (partial / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    entry = cache / key
    if entry.exists():
        shutil.rmtree(entry)  # an entry that failed its check
    os.rename(partial, entry)
    return entry


def fetch(store: ObjectStore, source: str, cache: Path, max_bytes: int | None) -> Path:
    """The local folder of the s3:// model ``source`` in ``cache``: the cached entry when it checks
    out, else downloaded into the cache (evicting others first when ``max_bytes`` is set)."""
    cache.mkdir(parents=True, exist_ok=True)
    objects = listing(store, source)
    key = entry_key(source, objects)
    entry = cache / key
    with locked(cache / f"{LOCK_PREFIX}{key}"):
        why = problem(entry, source, objects)
        if why is None:
            log.info("model cache: %s from %s (no download)", source, entry)
        else:
            if max_bytes is not None:
                with locked(cache / EVICTION_LOCK):
                    incoming = sum(size for _, size, _ in objects)
                    for removed in evict(cache, max_bytes, incoming, keep=key):
                        log.info("model cache: removed %s (least recently used, maxSize)", removed)
            log.info("model cache: downloading %s into %s (%s)", source, entry, why)
            entry = _download(store, source, objects, cache, key)
        (entry / MARKER).touch()  # last use, for eviction
    return entry
