"""A FineTuneJob as the SDK hands it out: its state, and what a user does with a run.

``Job`` holds the last state read from the API server (``refresh`` reads it again) and reaches
the run's output in object storage with this machine's credentials (:mod:`.storage`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune_api import wellknown
from kubetune_api.base import field_errors
from kubetune_api.reasons import TERMINAL_PHASES, Phase, Reason
from kubetune_api.resource import FineTuneJob
from kubetune_api.status import FineTuneJobStatus, Progress
from kubetune_trainer.checkpoints import list_checkpoints
from kubetune_trainer.results import sha256_file
from kubetune_trainer.storage import ObjectStore, join_uri

from . import storage
from .errors import (
    ChecksumMismatchError,
    JobCancelledError,
    JobFailedError,
    KubetuneError,
    NotReadyError,
    WaitTimeoutError,
)
from .kube import Kube, Obj
from .results import (
    Checkpoint,
    LossHistory,
    Manifest,
    checkpoint_of,
    history_from_metrics,
    history_from_trainer_state,
    parse_manifest,
)
from .storage import StorageOptions

#: Longest single watch request; the watch is opened again after it (and after a 410 Gone).
WATCH_CHUNK_S = 60
#: The Trainer's own state file in each checkpoint folder (its log history has the metrics).
TRAINER_STATE = "trainer_state.json"


def parse_job(obj: Obj) -> FineTuneJob:
    """A FineTuneJob as the API server returns it, as the typed API model."""
    try:
        return FineTuneJob.model_validate(obj)
    except ValidationError as exc:
        name = obj.get("metadata", {}).get("name")
        problems = "; ".join(field_errors(exc))
        raise KubetuneError(
            f"FineTuneJob {name} does not parse with this client's API types: {problems}"
        ) from exc


@dataclass(frozen=True)
class Download:
    """What :meth:`Job.download` wrote: the folder, each file (relative paths) and the manifest."""

    directory: Path
    files: tuple[str, ...]
    manifest: Manifest


class Job:
    """One FineTuneJob: its last read state plus the operations on the run."""

    def __init__(self, kube: Kube, obj: Obj, storage_options: StorageOptions | None = None) -> None:
        self._kube = kube
        self._storage_options = storage_options or StorageOptions()
        self._set(obj)

    def _set(self, obj: Obj) -> None:
        self.raw: Obj = obj
        self.resource: FineTuneJob = parse_job(obj)

    def __repr__(self) -> str:
        return f"Job({self.namespace}/{self.name}, phase={self.phase})"

    # -- state -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.resource.metadata.name)

    @property
    def namespace(self) -> str:
        return str(self.resource.metadata.namespace)

    @property
    def status(self) -> FineTuneJobStatus:
        return self.resource.status or FineTuneJobStatus()

    @property
    def phase(self) -> Phase | None:
        return self.status.phase

    @property
    def progress(self) -> Progress:
        return self.status.progress or Progress()

    @property
    def done(self) -> bool:
        """The run has ended and nothing of it runs any more (a Cancelling trainer is still saving)."""
        return self.phase in TERMINAL_PHASES and self.status.reason != Reason.CANCELLING

    @property
    def output_uri(self) -> str:
        return self.status.output_uri or self.resource.spec.output.uri

    @property
    def resource_version(self) -> str:
        return str(self.raw.get("metadata", {}).get("resourceVersion", ""))

    def refresh(self) -> Job:
        """Read the FineTuneJob again from the API server."""
        self._set(self._kube.get(self.namespace, self.name))
        return self

    # -- following a run -------------------------------------------------------------------
    def updates(self, timeout: float | None = None) -> Iterator[Job]:
        """This job now, then after every change, until a terminal phase or ``timeout`` seconds.

        Watches the API server (no polling); a watch that ends is opened again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        yield self.refresh()
        while not self.done:
            left = WATCH_CHUNK_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            seen = self.resource_version
            for obj in self._kube.watch(self.namespace, self.name, seen, int(min(left, WATCH_CHUNK_S))):
                self._set(obj)
                yield self
                if self.done:
                    return
            if self.refresh().resource_version != seen:  # missed while the watch reopened
                yield self

    def wait(self, timeout: float | None = None, *, cancelled_ok: bool = True) -> Job:
        """Block until the run ends: Succeeded (returns the job), Failed (:class:`JobFailedError`
        with the reason) or Cancelled (returns the job: a cancel is asked for, not an error;
        ``cancelled_ok=False`` raises :class:`JobCancelledError` instead, for code that needs the
        result); :class:`WaitTimeoutError` after ``timeout`` seconds."""
        for _ in self.updates(timeout):
            pass
        if self.phase == Phase.FAILED:
            raise JobFailedError(self.name, self.status.reason, self.status.message)
        if self.phase == Phase.CANCELLED and not cancelled_ok:
            raise JobCancelledError(self.name, self.status.message)
        if not self.done:
            raise WaitTimeoutError(
                f"FineTuneJob {self.name} is still {self.phase or 'without a phase'} after {timeout:.0f}s"
            )
        return self

    # -- spec.suspend ----------------------------------------------------------------------
    def suspend(self) -> Job:
        """Stop the trainer pod (``spec.suspend: true``); checkpoints are kept for a resume."""
        self._set(self._kube.merge_patch(self.namespace, self.name, {"spec": {"suspend": True}}))
        return self

    def resume(self) -> Job:
        """Run again from the newest complete checkpoint (``spec.suspend: false``)."""
        self._set(self._kube.merge_patch(self.namespace, self.name, {"spec": {"suspend": False}}))
        return self

    # -- spec.cancel -----------------------------------------------------------------------
    def cancel(self) -> Job:
        """Stop the run for good (``spec.cancel: true``): the trainer saves a checkpoint and stops,
        its Job is deleted, the FineTuneJob, its status and checkpoints stay (phase Cancelled).

        Cannot be undone (the API server refuses it); a run that already ended keeps its outcome.
        Idempotent: cancelling a cancelled job changes nothing.
        """
        self._set(self._kube.merge_patch(self.namespace, self.name, {"spec": {"cancel": True}}))
        return self

    # -- the trainer's log -----------------------------------------------------------------
    def logs(self, follow: bool = False, tail_lines: int | None = None) -> Iterator[str]:
        """The newest trainer pod's log through the API server (``follow``: as it grows)."""
        from .errors import NotFoundError

        pods = self._kube.trainer_pods(self.namespace, self.name)
        if not pods:
            raise NotFoundError(
                f"FineTuneJob {self.name} has no trainer pod (phase {self.phase}, {self.status.reason}); "
                "a finished Job's pods may be gone (lifecycle.ttlSecondsAfterFinished)"
            )
        yield from self._kube.pod_log(self.namespace, pods[-1]["metadata"]["name"], follow, tail_lines)

    # -- the output in object storage ------------------------------------------------------
    def _store(self) -> ObjectStore:
        return storage.object_store(self.resource.spec.storage, self._storage_options)

    def metrics(self) -> dict[str, Any]:
        """The run's ``metrics.json`` (loss history, eval loss, tokens/s, runtime, data stats)."""
        uri = join_uri(self.output_uri, wellknown.METRICS)
        body = storage.read_object(self._store(), uri, f"{wellknown.METRICS} (written when the run succeeds)")
        loaded: dict[str, Any] = json.loads(body)
        return loaded

    def manifest(self) -> Manifest:
        """The published result's manifest; :class:`NotReadyError` until the trainer wrote it (last)."""
        uri = join_uri(self.output_uri, wellknown.MANIFEST)
        body = storage.read_object(
            self._store(), uri, f"{wellknown.MANIFEST}: the result is not published (phase {self.phase})"
        )
        return parse_manifest(uri, body)

    def checkpoints(self) -> list[Checkpoint]:
        """Each complete checkpoint under the output prefix, oldest first, with its metrics."""
        store = self._store()
        with storage.storage_errors(self.output_uri):
            complete, _incomplete = list_checkpoints(store, self.output_uri)
        return [
            checkpoint_of(
                ckpt.step,
                ckpt.uri,
                _optional(store, join_uri(ckpt.uri, wellknown.CHECKPOINT_MARKER)),
                _optional(store, join_uri(ckpt.uri, TRAINER_STATE)),
            )
            for ckpt in complete
        ]

    def loss_history(self) -> LossHistory:
        """Train and eval loss by step: from ``metrics.json`` once the run is published, else from
        the newest complete checkpoint's ``trainer_state.json`` (up to that checkpoint's step)."""
        store = self._store()
        metrics_uri = join_uri(self.output_uri, wellknown.METRICS)
        published = _optional(store, metrics_uri)
        if published is not None:
            return history_from_metrics(json.loads(published), metrics_uri)
        with storage.storage_errors(self.output_uri):
            complete, _incomplete = list_checkpoints(store, self.output_uri)
        if not complete:
            raise NotReadyError(
                f"{self.name} has no complete checkpoint and no result yet (phase {self.phase})"
            )
        state_uri = join_uri(complete[-1].uri, TRAINER_STATE)
        return history_from_trainer_state(_optional(store, state_uri) or b"{}", state_uri)

    def download(self, directory: str | os.PathLike[str], merged: bool = True) -> Download:
        """Download the published result into ``directory``, each file's size and sha256 checked
        against the manifest (a mismatching file is deleted: :class:`ChecksumMismatchError`).

        ``merged=False`` leaves out the merged model (``merged/``, with ``output.mergeAdapter``).
        """
        manifest = self.manifest()
        store = self._store()
        root = Path(directory)
        wanted = [f for f in manifest.files if merged or not f.path.startswith(f"{wellknown.MERGED_DIR}/")]
        for entry in wanted:
            dest = root / entry.path
            partial = dest.with_name(dest.name + ".part")
            storage.download(store, join_uri(self.output_uri, entry.path), partial)
            _verify(partial, entry.path, entry.size, entry.sha256)
            partial.replace(dest)
        (root / wellknown.MANIFEST).write_text(json.dumps(manifest.raw, indent=2) + "\n")
        return Download(root, tuple(f.path for f in wanted), manifest)


def _optional(store: ObjectStore, uri: str) -> bytes | None:
    try:
        return storage.read_object(store, uri, "object")
    except NotReadyError:
        return None


def _verify(path: Path, name: str, size: int, sha256: str) -> None:
    actual_size = path.stat().st_size
    actual = sha256_file(path) if actual_size == size else None
    if actual == sha256:
        return
    path.unlink()
    got = f"{actual_size} bytes" if actual is None else f"sha256 {actual}"
    want = f"{size} bytes" if actual is None else f"sha256 {sha256}"
    raise ChecksumMismatchError(
        f"{name}: the downloaded file does not match the manifest ({got}, the manifest says {want}); "
        "it was deleted: the object changed after the run published it"
    )
