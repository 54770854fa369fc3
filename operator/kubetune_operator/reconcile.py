"""Reconciliation: read the actual state, create what is missing, write status if it changed.

Sits between the pure layer (builders, status) and the kopf handlers. Every entry point is
idempotent and level-based, so it is safe to call from any handler, any number of times, from
any replica, before or after a restart.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from kubetune_api.coordinates import GROUP, KIND
from kubetune_api.reasons import TERMINAL_PHASES, ConditionType, Phase, Reason

from . import builders, names, status
from .kube import FINETUNEJOBS, JOBS, PODS, SERVICEACCOUNTS, WORKLOADS, Kube, KubeError

log = logging.getLogger(__name__)
#: Answers that refuse a child for a reason the user (or an admin) must fix: bad request (strict
#: field validation), forbidden (a quota, RBAC, an admission policy), invalid.
REFUSALS = frozenset({400, 403, 422})
#: Held on a Job that its ttlSecondsAfterFinished will delete, until the Job's outcome is in the
#: FineTuneJob's status: a Job that finished and expired while no operator ran (or faster than
#: the operator read it) would otherwise vanish unseen and read as JobDeleted.
OUTCOME_FINALIZER = f"{GROUP}/outcome"

Obj = dict[str, Any]
FINETUNEJOB_KIND: Final = KIND
#: Status patch batching: a status change within the same phase (a new reason or message, the
#: attempts, the exit code...) is written no sooner than this long after the FineTuneJob's last
#: status write, so that a step that lasts less (WaitingForPod -> PodStarting, a pod that
#: finished while its Job is not yet complete) costs no write of its own; a phase change is
#: written at once. The deferred change is written by a sync the caller schedules.
STATUS_BATCH_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Trigger:
    """The watch event that asks for a sync: its object as it arrived, and when (``time.monotonic()``,
    taken when kopf hands the event over, before the sync waits for a worker or for the lock)."""

    body: Mapping[str, Any]
    received: float


class Skipped(enum.Enum):
    """A sync that did nothing: the last completed one had already read what its trigger says."""

    SKIPPED = "skipped"


SKIPPED: Final = Skipped.SKIPPED


@dataclass(frozen=True)
class _Seen:
    """What the last completed sync of one FineTuneJob read: when it began reading, the
    (uid, resourceVersion) of every object as it last saw it, and the FineTuneJob's inputs."""

    began: float
    versions: frozenset[tuple[str, str]]
    inputs: tuple[Any, ...]
    #: When this reconciler last wrote the FineTuneJob's status (``time.monotonic()``).
    written: float


def _versions(objects: Iterable[Mapping[str, Any]]) -> Iterable[tuple[str, str]]:
    for obj in objects:
        meta = obj.get("metadata") or {}
        yield str(meta.get("uid")), str(meta.get("resourceVersion"))


def _inputs(ftj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a sync reads of a FineTuneJob itself: identity, generation (the spec), deletion, status.

    Labels, annotations (kopf's own) and managed fields are not read, so a change to them alone
    asks for no sync. The status is kept as a hash, not a copy (a few bytes per FineTuneJob).
    """
    meta = ftj.get("metadata") or {}
    digest = hash(json.dumps(ftj.get("status") or {}, sort_keys=True))
    return meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"), digest


@dataclass(frozen=True)
class Outcome:
    """What one sync saw and did."""

    ftj: Obj
    before: status.Verdict | None
    after: status.Verdict
    patched: bool
    created: tuple[str, ...] = ()
    #: Children whose names are held by objects of another owner (the Job waits for them).
    blocked: tuple[str, ...] = ()
    #: Why the children could not be created this time (the spec, or the API server's refusal).
    hold: status.Hold | None = None
    #: Seconds until a status change held back by :data:`STATUS_BATCH_SECONDS` may be written
    #: (``after`` is then still the recorded verdict): sync again then.
    deferred: float | None = None


def _verdict_of(previous: Mapping[str, Any]) -> status.Verdict | None:
    if not previous.get("phase"):
        return None
    return status.Verdict(Phase(previous["phase"]), previous.get("reason", ""), previous.get("message", ""))


def _created_before(ftj: Mapping[str, Any]) -> bool:
    previous = ftj.get("status") or {}
    return previous.get("phase") in TERMINAL_PHASES or any(
        c.get("type") == ConditionType.CREATED and c.get("status") == "True"
        for c in previous.get("conditions") or []
    )


def _owned_by(obj: Mapping[str, Any], ftj: Mapping[str, Any]) -> bool:
    uid = ftj["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _holds_outcome(job: Mapping[str, Any]) -> bool:
    return OUTCOME_FINALIZER in (job.get("metadata", {}).get("finalizers") or [])


def _outcome_needs_holding(job: Mapping[str, Any], phase: str) -> bool:
    """Whether the Job must not vanish yet: its TTL may delete it before its outcome is recorded.

    Not once the status shows the outcome (a terminal phase, just written), and not for a Job
    deleted before it finished (its FineTuneJob then fails with JobDeleted, as it should).
    """
    if phase in TERMINAL_PHASES or job["metadata"].get("deletionTimestamp"):
        return False
    return job.get("spec", {}).get("ttlSecondsAfterFinished") is not None


#: Threads creating a new FineTuneJob's ConfigMap, ServiceAccount, Role, RoleBinding, NetworkPolicy.
PREREQUISITE_WORKERS: Final = 16


class MissingServiceAccountError(LookupError):
    """``identity.serviceAccountName`` names a ServiceAccount that does not exist (yet)."""


@dataclass
class Reconciler:
    """Reconciles FineTuneJobs through one :class:`Kube` client."""

    kube: Kube
    default_image: str
    trainer_egress: builders.Egress | None = None
    clock: Callable[[], datetime.datetime] = field(default=lambda: datetime.datetime.now(datetime.UTC))
    #: The clock of :attr:`Trigger.received` and of when a sync began reading.
    monotonic: Callable[[], float] = time.monotonic
    _locks: defaultdict[tuple[str, str], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock), init=False, repr=False
    )
    _locks_guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _seen: dict[tuple[str, str], _Seen] = field(default_factory=dict, init=False, repr=False)
    #: Creates a new FineTuneJob's ConfigMap, ServiceAccount, Role, RoleBinding (and NetworkPolicy)
    #: at once: none needs another, and one after the other they were four round trips before the
    #: Job (the apply -> Job latency under load, bench/bench_operator_scale.py --mode steady).
    _prerequisites: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PREREQUISITE_WORKERS, thread_name_prefix="children"),
        init=False,
        repr=False,
    )

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    def known(self, namespace: str, name: str) -> bool:
        """Whether this reconciler has completed a sync of the FineTuneJob (it is not new to it)."""
        return (namespace, name) in self._seen

    def forget(self, namespace: str, name: str) -> None:
        """Drop per-object state once the FineTuneJob is gone."""
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._seen.pop((namespace, name), None)

    def ensure_children(self, ftj: Mapping[str, Any]) -> tuple[Obj | None, tuple[str, ...], tuple[str, ...]]:
        """Create every missing child (ConfigMap, ServiceAccount, Role, RoleBinding, Job).

        Returns the Job, the kinds created, and the children blocked by a same-named object of
        another owner (typically a deleted FineTuneJob of the same name whose children the
        garbage collector has not removed yet). While anything is blocked, the Job is not
        created (it would mount the other owner's config); None is returned instead.
        """
        created: list[str] = []
        blocked: list[str] = []
        children = builders.children(ftj, self.default_image, self.trainer_egress)
        job_obj = children[-1]  # the Job last, once what its pod needs exists
        prerequisites = children[:-1]
        for obj, (actual, was_created) in zip(
            prerequisites, self._prerequisites.map(self.kube.ensure, prerequisites), strict=True
        ):
            if was_created:
                created.append(obj["kind"])
            if not _owned_by(actual, ftj):
                blocked.append(f"{obj['kind']} {obj['metadata']['name']}")
        if blocked:
            return None, tuple(created), tuple(blocked)
        self._check_own_service_account(ftj)
        if _outcome_needs_holding(job_obj, ""):
            # Held from its creation: it may finish before this operator (or the next) looks.
            job_obj["metadata"]["finalizers"] = [OUTCOME_FINALIZER]
        job, was_created = self.kube.ensure(job_obj)
        if was_created:
            created.append("Job")
        if not _owned_by(job, ftj):
            return None, tuple(created), (f"Job {job_obj['metadata']['name']}",)
        return job, tuple(created), ()

    def _check_own_service_account(self, ftj: Mapping[str, Any]) -> None:
        """A Job whose ServiceAccount is missing gets no pod, and says so only in an Event: hold it."""
        own = builders.spec_of(ftj).identity.service_account_name
        namespace = ftj["metadata"]["namespace"]
        if own is not None and self.kube.get(SERVICEACCOUNTS, namespace, own) is None:
            raise MissingServiceAccountError(
                f"identity.serviceAccountName {own} does not exist in namespace {namespace}: create it "
                "(the trainer runs as it), or unset identity.serviceAccountName"
            )

    def align_job(self, ftj: Mapping[str, Any], job: Obj) -> Obj:
        """Apply spec.suspend and spec.lifecycle changes to the Job (and, queued, to its Workload)."""
        if status.verdict(ftj, job, []).phase in TERMINAL_PHASES:
            return job
        self.align_workload(ftj, job)
        patch = builders.job_patch(ftj, job)
        if patch is None:
            return job
        meta = job["metadata"]
        return self.kube.patch(JOBS, meta["namespace"], meta["name"], patch)

    def align_workload(self, ftj: Mapping[str, Any], job: Obj) -> None:
        """With a queue, spec.suspend sets Kueue's Workload ``spec.active`` (Kueue owns the Job's
        ``spec.suspend`` and would undo a change to it); Kueue then evicts or re-admits the Job."""
        spec = builders.spec_of(ftj)
        if not spec.scheduling.queue_name:
            return
        # Only when the Job is not where spec.suspend wants it (a list per change, not per event).
        if bool(job.get("spec", {}).get("suspend")) == spec.suspend and not spec.suspend:
            return
        meta = job["metadata"]
        try:
            selector = f"{names.LABEL_KUEUE_JOB_UID}={meta['uid']}"
            workloads = self.kube.list(WORKLOADS, meta["namespace"], selector)
        except KubeError as err:
            if err.status == 404:  # Kueue is not installed: nothing admits the Job either
                return
            raise
        for workload in workloads:
            patch = builders.workload_patch(spec, workload)
            if patch is not None:
                self.kube.patch(WORKLOADS, meta["namespace"], workload["metadata"]["name"], patch)

    def hold_outcome(self, job: Obj, hold: bool) -> Obj | None:
        """Add or remove :data:`OUTCOME_FINALIZER` (other finalizers kept); the Job, None if gone."""
        for _attempt in range(3):
            meta = job["metadata"]
            current = list(meta.get("finalizers") or [])
            if (OUTCOME_FINALIZER in current) == hold or (hold and meta.get("deletionTimestamp")):
                return job  # as wanted, or being deleted (no finalizer can be added then)
            wanted = [*current, OUTCOME_FINALIZER] if hold else [f for f in current if f != OUTCOME_FINALIZER]
            # The resourceVersion makes it a compare-and-swap: no other finalizer is lost.
            patch = {"metadata": {"finalizers": wanted, "resourceVersion": meta["resourceVersion"]}}
            try:
                return self.kube.patch(JOBS, meta["namespace"], meta["name"], patch)
            except KubeError as err:
                if err.status != 409:
                    raise
            fresh = self.kube.get(JOBS, meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                return None
            job = fresh
        path = JOBS.path(job["metadata"]["namespace"], job["metadata"]["name"])
        raise KubeError(409, "PATCH", path, "the Job kept changing while its finalizers were updated")

    def release_orphan(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone (or going): its Job must not wait for an outcome nobody will read."""
        job = self.kube.get(JOBS, namespace, names.job_name(name))
        if job is not None and _holds_outcome(job):
            self.hold_outcome(job, False)

    def cancel_job(self, job: Obj | None) -> Obj | None:
        """spec.cancel: delete the trainer Job with foreground propagation; the Job (being deleted),
        or None once gone.

        Foreground: the garbage collector deletes the pods first, each with its grace period (the
        trainer gets SIGTERM and saves a checkpoint, as on suspend), and the Job controller starts no
        new pod for a Job being deleted; the Job itself (and Kueue's Workload, which it owns) goes
        once they are gone, so no pod is orphaned and the status can say Cancelling until then. The
        uid precondition keeps a same-named Job of someone else safe.
        """
        if job is None:
            return None
        meta = job["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if not meta.get("deletionTimestamp"):
            body = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "propagationPolicy": "Foreground",
                "preconditions": {"uid": uid},
            }
            try:
                self.kube.request("DELETE", JOBS.path(namespace, name), body)
            except KubeError as err:
                if err.status not in (404, 409):  # gone already; another Job of that name
                    raise
        fresh = self.kube.get(JOBS, namespace, name)
        return fresh if fresh is not None and fresh["metadata"]["uid"] == uid else None

    def bring_children(
        self, ftj: Mapping[str, Any], job: Obj | None, *, ensure_all: bool
    ) -> tuple[Obj | None, tuple[str, ...], tuple[str, ...], status.Hold | None]:
        """Create the children if they were never created (or, with ``ensure_all``, any that are
        missing) and align the Job; (the Job, kinds created, names blocked, why it is held)."""
        created: tuple[str, ...] = ()
        blocked: tuple[str, ...] = ()
        may_create = (ftj.get("status") or {}).get("phase") not in TERMINAL_PHASES
        try:
            if (job is None and not _created_before(ftj)) or (ensure_all and job is not None and may_create):
                job, created, blocked = self.ensure_children(ftj)
            if job is not None:
                job = self.align_job(ftj, job)
        except builders.InvalidSpecError as err:
            return job, created, blocked, status.Hold(Reason.INVALID_SPEC, f"the spec does not parse: {err}")
        except MissingServiceAccountError as err:
            return job, created, blocked, status.Hold(Reason.SERVICE_ACCOUNT_MISSING, str(err))
        except KubeError as err:
            if err.status not in REFUSALS:
                raise
            # An invalid field (strict validation), a quota, an admission webhook: the answer says what.
            return (
                job,
                created,
                blocked,
                status.Hold(Reason.CREATE_REFUSED, f"{err.method} {err.path}: {err.message}"),
            )
        return job, created, blocked, None

    def sync(
        self, namespace: str, name: str, *, ensure_all: bool = False, trigger: Trigger | None = None
    ) -> Outcome | Skipped | None:
        """Bring one FineTuneJob's children and status in line with reality.

        The Job is created if it was never created; ``ensure_all`` also re-creates any other
        missing child, as the first sync of each FineTuneJob by this reconciler always does (an
        operator start adopts what exists), not every sync after (every pod event). Returns None
        if the FineTuneJob is gone or being deleted, and :data:`SKIPPED` when ``trigger`` (the
        watch event that asks for this sync) brings nothing the last completed sync had not read
        (see :meth:`answered`): one sync then serves a burst of events.
        """
        key = (namespace, name)
        with self._lock(namespace, name):
            if trigger is not None and self.answered(namespace, name, trigger):
                return SKIPPED
            began = self.monotonic()
            read: list[Mapping[str, Any]] = []
            seen = self._seen.get(key)
            written = seen.written if seen is not None else -math.inf
            outcome = self._sync(
                namespace, name, ensure_all=ensure_all or seen is None, read=read, written=written
            )
            if outcome is None:
                self._seen.pop(key, None)
            else:
                written = self.monotonic() if outcome.patched else written
                self._seen[key] = _Seen(began, frozenset(_versions(read)), _inputs(outcome.ftj), written)
            return outcome

    def answered(self, namespace: str, name: str, trigger: Trigger) -> bool:
        """Whether the last completed sync of the FineTuneJob already answered ``trigger``: it began
        reading after the event arrived (its reads, all quorum reads, are at least as new), or it
        read the event's object at this very version, or (a FineTuneJob event) the FineTuneJob's own
        inputs and status are as that sync left them (the echo of its status patch, kopf's
        annotations). Safe without the lock: an answer a sync in progress makes stale costs a sync."""
        seen = self._seen.get((namespace, name))
        if seen is None:
            return False
        if seen.began > trigger.received:
            return True
        meta = trigger.body.get("metadata") or {}
        if (meta.get("uid"), meta.get("resourceVersion")) in seen.versions:
            return True
        return trigger.body.get("kind") == FINETUNEJOB_KIND and _inputs(trigger.body) == seen.inputs

    def _sync(
        self, namespace: str, name: str, *, ensure_all: bool, read: list[Mapping[str, Any]], written: float
    ) -> Outcome | None:
        """:meth:`sync` under the lock; appends to ``read`` every object as it read or wrote it.
        ``written``: when this reconciler last wrote the status (for :data:`STATUS_BATCH_SECONDS`)."""
        ftj = self.kube.get(FINETUNEJOBS, namespace, name)
        if ftj is None or ftj["metadata"].get("deletionTimestamp"):
            self.release_orphan(namespace, name)
            return None
        read.append(ftj)
        previous: Mapping[str, Any] = ftj.get("status") or {}
        # No status: no operator has synced it yet, so it has no Job (and creating one finds any
        # same-named Job of another owner: the create answers 409, the Job is then read).
        job = self.kube.get(JOBS, namespace, names.job_name(name)) if previous else None
        if job is not None and not _owned_by(job, ftj):
            if _holds_outcome(job):  # its owner is gone: let the garbage collector finish
                self.hold_outcome(job, False)
            job = None  # a same-named Job of a deleted FineTuneJob, still being collected
        created: tuple[str, ...] = ()
        blocked: tuple[str, ...] = ()
        hold: status.Hold | None = None
        if status.verdict(ftj, job, []).phase == Phase.CANCELLED:
            job = self.cancel_job(job)  # and create nothing, ever again
        else:
            job, created, blocked, hold = self.bring_children(ftj, job, ensure_all=ensure_all)
        if hold is not None:
            log.warning("%s/%s: %s: %s", namespace, name, hold.reason, hold.message)
        pods: list[Obj] = []
        if job is not None:
            read.append(job)
        if job is not None and "Job" not in created:  # a Job created just now has no pod yet
            selector = f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}"
            pods = self.kube.list(PODS, namespace, selector)
            read += pods
        desired = status.compute(ftj, job, pods, self.clock(), blocked=blocked, hold=hold)
        patch = status.patch(previous, desired)
        deferred = None
        if patch is not None and desired["phase"] == previous.get("phase"):
            wait = written + STATUS_BATCH_SECONDS - self.monotonic()
            deferred, patch = (wait, None) if wait > 0 else (None, patch)
        if patch is not None:
            ftj = self.kube.patch(FINETUNEJOBS, namespace, name, {"status": patch}, "status")
            read.append(ftj)
        if job is not None:
            # Only now that the status holds the outcome may the Job's TTL remove it.
            held = self.hold_outcome(job, _outcome_needs_holding(job, desired["phase"]))
            read += [held] if held is not None else []
        after = status.Verdict(Phase(desired["phase"]), desired.get("reason", ""), desired.get("message", ""))
        before = _verdict_of(previous)
        if deferred is not None and before is not None:
            after = before  # what the status says until the deferred write
        return Outcome(ftj, before, after, patch is not None, created, blocked, hold, deferred)
