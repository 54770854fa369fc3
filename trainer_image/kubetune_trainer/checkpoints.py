"""Checkpoints in object storage: ``<output>/checkpoints/step-N/`` plus a marker written last.

A checkpoint counts only once its marker exists, so a pod killed mid-upload
leaves an incomplete folder that the next start ignores and deletes. The newest
complete checkpoint is where a restarted pod resumes; ``saveTotalLimit`` is
applied to the complete ones in storage as well as on local disk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune_api import wellknown

from . import errors
from .storage import ObjectStore, failure_types, join_uri

log = logging.getLogger(__name__)

MARKER = wellknown.CHECKPOINT_MARKER
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    uri: str


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, wellknown.CHECKPOINTS_DIR)


def list_checkpoints(
    store: ObjectStore, output_uri: str
) -> tuple[list[RemoteCheckpoint], list[RemoteCheckpoint]]:
    """``(complete, incomplete)`` checkpoints, each sorted by step."""
    base = checkpoints_uri(output_uri)
    complete: list[RemoteCheckpoint] = []
    incomplete: list[RemoteCheckpoint] = []
    for name in store.list_folders(base):
        match = _STEP.match(name)
        if not match:
            continue
        ckpt = RemoteCheckpoint(int(match.group(1)), join_uri(base, name))
        (complete if store.exists(join_uri(ckpt.uri, MARKER)) else incomplete).append(ckpt)
    return sorted(complete, key=lambda c: c.step), sorted(incomplete, key=lambda c: c.step)


def upload_checkpoint(
    store: ObjectStore, local_dir: Path, output_uri: str, step: int, fingerprint: str | None = None
) -> RemoteCheckpoint:
    """Upload a Trainer checkpoint folder, then its completion marker (naming the run).

    Each object waits out an unavailable store (a restart, a failover: ``ObjectStore.ride_out``)
    instead of crashing the run and losing a save interval; the marker still goes last.
    """
    uri = join_uri(checkpoints_uri(output_uri), f"step-{step}")
    started = time.monotonic()
    names = store.upload_folder(local_dir, uri, ride_out=True)
    marker: dict[str, Any] = {"step": step, "files": len(names), "time": time.time()}
    if fingerprint:
        marker["fingerprint"] = fingerprint
    marker_uri, body = join_uri(uri, MARKER), json.dumps(marker).encode()
    store.ride_out(f"upload of {marker_uri}", partial(store.put_bytes, marker_uri, body, "application/json"))
    log.info(
        "checkpoint: step %d synced to %s (%d files, %.1fs)",
        step,
        uri,
        len(names),
        time.monotonic() - started,
    )
    return RemoteCheckpoint(step, uri)


def delete_checkpoint(store: ObjectStore, ckpt: RemoteCheckpoint) -> None:
    """Delete the marker first, so a half-deleted checkpoint is never taken as complete."""
    store.delete(join_uri(ckpt.uri, MARKER))
    store.delete_folder(ckpt.uri)


def prune(store: ObjectStore, output_uri: str, keep: int | None) -> list[int]:
    """Keep the ``keep`` newest complete checkpoints; delete the rest. Returns the deleted steps.

    A checkpoint the store refuses to delete is logged as a warning and left; training goes on.
    """
    if keep is None:
        return []
    try:
        complete, _ = list_checkpoints(store, output_uri)
    except failure_types() as exc:  # the store went away right after the marker: prune next time
        log.warning("checkpoint: could not list the checkpoints to prune (%s); training goes on", exc)
        return []
    doomed = complete[:-keep] if len(complete) > keep else []
    deleted: list[int] = []
    for ckpt in doomed:
        try:
            delete_checkpoint(store, ckpt)
        except failure_types() as exc:
            # Training goes on: the kept checkpoints are untouched, and the marker goes first, so
            # a checkpoint this left behind is either still complete (marker kept: pruned again
            # at the next save) or incomplete (never resumed from; the next start deletes it).
            log.warning("checkpoint: could not prune step %d, left in storage: %s", ckpt.step, exc)
            continue
        deleted.append(ckpt.step)
    if deleted:
        log.info("checkpoint: pruned steps %s (saveTotalLimit %d)", deleted, keep)
    return deleted


def _check_owner(store: ObjectStore, ckpt: RemoteCheckpoint, fingerprint: str) -> None:
    marker = json.loads(store.get_bytes(join_uri(ckpt.uri, MARKER)))
    errors.check_same_run(ckpt.uri, marker, fingerprint)


def check_owner(store: ObjectStore, output_uri: str, fingerprint: str) -> None:
    """Fail fast (before any model is loaded) if the newest checkpoint is another run's."""
    complete, _ = list_checkpoints(store, output_uri)
    if complete:
        _check_owner(store, complete[-1], fingerprint)


def restore_latest(
    store: ObjectStore, output_uri: str, local_root: Path, fingerprint: str | None = None
) -> Path | None:
    """Download the newest complete checkpoint to ``local_root/checkpoint-N``; clean up broken ones.

    With ``fingerprint``, a checkpoint another configuration wrote is refused (never resumed
    from, never deleted): :class:`errors.ForeignOutputError`.
    """
    complete, incomplete = list_checkpoints(store, output_uri)
    if complete and fingerprint:
        _check_owner(store, complete[-1], fingerprint)
    for ckpt in incomplete:
        log.warning("checkpoint: deleting incomplete %s (no %s marker)", ckpt.uri, MARKER)
        try:
            store.delete_folder(ckpt.uri)
        except failure_types() as exc:
            # Without its marker it is never resumed from: leftovers are clutter, not a reason to fail.
            log.warning("checkpoint: could not delete incomplete %s: %s", ckpt.uri, exc)
    if not complete:
        return None
    latest = complete[-1]
    dest = local_root / f"checkpoint-{latest.step}"
    if dest.exists():
        shutil.rmtree(dest)
    store.download_folder(latest.uri, dest)
    (dest / MARKER).unlink(missing_ok=True)
    log.info("checkpoint: resuming from step %d (%s)", latest.step, latest.uri)
    return dest


def step_of(checkpoint: Path) -> int:
    """The step of a local Trainer checkpoint folder (``checkpoint-N``)."""
    return int(checkpoint.name.split("-")[-1])


def local_latest(root: Path) -> Path | None:
    """A checkpoint left on local disk (same pod, restarted container) when storage had none."""
    found = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(found, key=step_of, default=None)


class Terminated(Exception):  # noqa: N818 -- an outcome, not a bug
    """Training stopped on SIGTERM (after saving a checkpoint when it was training)."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum = signum
        self.step = step
        where = f" after saving step {step}" if step is not None else ""
        super().__init__(f"stopped by signal {signum}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TerminationFlag:
    """SIGTERM while training: save a checkpoint and stop; before training: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self.training = False
        self.signum: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if not self.training:
            raise Terminated(signum)
        if not self.requested:
            log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True


def make_checkpoint_callback(
    store: ObjectStore,
    output_uri: str,
    keep: int | None,
    flag: TerminationFlag,
    fingerprint: str | None = None,
) -> Any:
    """A TrainerCallback that syncs every saved checkpoint and reacts to SIGTERM."""
    from transformers import TrainerCallback

    class CheckpointSync(TrainerCallback):
        def __init__(self) -> None:
            self.last: RemoteCheckpoint | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if flag.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                self.last = upload_checkpoint(store, local, output_uri, state.global_step, fingerprint)
                prune(store, output_uri, keep)
            return control

    return CheckpointSync()
