"""What a run leaves in object storage, read as typed values: the manifest, checkpoints, metrics.

Pure functions over bytes and dicts (no client): the layout is the one in
:mod:`kubetune_api.wellknown` and the trainer's ``results``/``checkpoints`` modules.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubetune_api import wellknown

from .errors import StorageError


@dataclass(frozen=True)
class ManifestFile:
    """One published file: its path under the output prefix, size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: written last, so the result it lists is complete."""

    uri: str
    files: tuple[ManifestFile, ...]
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint (its ``_COMPLETE`` marker exists) and the metrics at its step."""

    step: int
    uri: str
    saved_at: datetime.datetime | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The API's camelCase names, as ``--output json`` prints them."""
        return {
            "step": self.step,
            "uri": self.uri,
            "savedAt": self.saved_at.isoformat() if self.saved_at else None,
            "loss": self.loss,
            "evalLoss": self.eval_loss,
            "learningRate": self.learning_rate,
            "epoch": self.epoch,
        }


def _safe_path(path: Any, uri: str) -> str:
    """A manifest path that stays inside the download folder (no absolute paths, no ``..``)."""
    if not isinstance(path, str) or not path:
        raise StorageError(f"{uri}: a file entry has no path")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or ".." in parts or "\\" in path:
        raise StorageError(f"{uri}: refusing the file path {path!r} (it leaves the download folder)")
    return path


def parse_manifest(uri: str, body: bytes) -> Manifest:
    """``manifest.json``'s bytes as a :class:`Manifest`; anything malformed is a :class:`StorageError`."""
    try:
        raw = json.loads(body)
        entries = raw["files"]
        files = tuple(
            ManifestFile(_safe_path(e["path"], uri), int(e["size"]), str(e["sha256"]).lower())
            for e in entries
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{uri} is not a kubetune manifest ({exc})") from exc
    if raw.get("version") != wellknown.MANIFEST_VERSION:
        raise StorageError(
            f"{uri} has manifest version {raw.get('version')!r}; this client reads version "
            f"{wellknown.MANIFEST_VERSION}"
        )
    return Manifest(uri=uri, files=files, raw=raw)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _latest(history: list[dict[str, Any]], key: str, step: int) -> float | None:
    values = [e[key] for e in history if key in e and int(e.get("step", 0)) <= step]
    return _number(values[-1]) if values else None


def checkpoint_of(step: int, uri: str, marker: bytes | None, trainer_state: bytes | None) -> Checkpoint:
    """A checkpoint from its marker and its ``trainer_state.json`` (the Trainer's log history).

    Either may be missing or unreadable (a checkpoint from another tool): the step still counts.
    """
    saved_at = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        moment = _number(json.loads(marker or b"{}").get("time"))
        saved_at = datetime.datetime.fromtimestamp(moment, datetime.UTC) if moment is not None else None
    history: list[dict[str, Any]] = []
    epoch = None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        state = json.loads(trainer_state or b"{}")
        history = [e for e in state.get("log_history", []) if isinstance(e, dict)]
        epoch = _number(state.get("epoch"))
    return Checkpoint(
        step=step,
        uri=uri,
        saved_at=saved_at,
        loss=_latest(history, "loss", step),
        eval_loss=_latest(history, "eval_loss", step),
        learning_rate=_latest(history, "learning_rate", step),
        epoch=epoch,
    )


@dataclass(frozen=True)
class LossHistory:
    """Train and eval loss by step, and where they were read from."""

    train: tuple[tuple[int, float], ...]
    eval: tuple[tuple[int, float], ...]
    source: str


def _points(entries: Any, key: str) -> tuple[tuple[int, float], ...]:
    found: dict[int, float] = {}
    for entry in entries if isinstance(entries, list) else []:
        step, value = (entry.get("step"), entry.get(key)) if isinstance(entry, dict) else (None, None)
        if isinstance(step, int) and isinstance(value, int | float):
            found[step] = float(value)  # a repeated step (the final evaluation) keeps the last value
    return tuple(sorted(found.items()))


def history_from_metrics(metrics: dict[str, Any], source: str) -> LossHistory:
    """From ``metrics.json``: ``lossHistory`` and ``evalLossHistory`` (``{step, loss}`` entries)."""
    return LossHistory(
        _points(metrics.get("lossHistory"), "loss"), _points(metrics.get("evalLossHistory"), "loss"), source
    )


def history_from_trainer_state(trainer_state: bytes, source: str) -> LossHistory:
    """From a checkpoint's ``trainer_state.json``: the Trainer's ``log_history`` up to that step."""
    try:
        history = json.loads(trainer_state).get("log_history", [])
    except (ValueError, AttributeError):
        history = []
    return LossHistory(_points(history, "loss"), _points(history, "eval_loss"), source)
