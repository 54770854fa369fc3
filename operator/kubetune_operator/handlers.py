"""kopf handlers: thin, named ``<kind>_<event>``; each one asks for :meth:`Reconciler.sync`.

FineTuneJobs, their Jobs and their Pods have event handlers only: every event queues the
FineTuneJob's key for one level-based sync (:mod:`.workqueue`: a key waits at most once, so a
burst of events costs one sync), unless the last sync already read what the event says (the echo
of its own writes). The first sync of a FineTuneJob in this process also re-creates any missing
child: an operator start adopts. A FineTuneJob that is held, blocked, has a status write deferred
or whose sync failed is queued again by a timer. No create, update or resume handler means kopf
keeps no state on a FineTuneJob: no ``last-handled-configuration`` annotation, which would be a
write per job and a copy of the whole spec in every FineTuneJob read. No deletion handlers and no
timers or daemons either: kopf puts no finalizer on a FineTuneJob, and deleting one never waits
for the operator (owner references let the garbage collector remove the children). The
FineTuneSweep handlers keep kopf's state in ``kubetune.dev/*`` annotations.

Run with ``python -m kubetune_operator`` (reads the KUBETUNE_* environment), or
``kopf run -m kubetune_operator.handlers --all-namespaces`` (settings from the same environment).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from kubetune_api import coordinates
from kubetune_api import sweep as sweep_api
from kubetune_api.reasons import Phase, is_warning
from kubetune_api.sweep_reasons import SweepReason

from . import names, sweep
from .kube import Kube
from .metrics import Metrics
from .reconcile import Outcome, Reconciler, Skipped, Trigger
from .settings import SYNC_WORKERS, OperatorConfig, configure, from_env
from .sweep_reconcile import SweepOutcome, SweepReconciler
from .workqueue import Key, Retries, SyncQueue

FTJ = (coordinates.GROUP, coordinates.VERSION, coordinates.PLURAL)
SWEEP = (coordinates.GROUP, coordinates.VERSION, sweep_api.PLURAL)
_EVENT_MESSAGE_LIMIT = 1000
log = logging.getLogger(__name__)
#: How soon a held FineTuneJob (a spec that does not parse, a refused child) is tried again.
HOLD_RETRY_SECONDS = 20
#: How soon a FineTuneJob whose children's names another owner still holds is tried again
#: (nothing it watches announces the end of another owner's garbage collection).
BLOCKED_RETRY_SECONDS = 5


@dataclass
class _Loop:
    """The event loop and kopf's context (which Events are posted through) as the latest handler
    saw them. One object, shared by the queue's threads and every object's memo (kopf hands each
    object a shallow copy of the operator's memo: an attribute set on it is that object's only)."""

    loop: asyncio.AbstractEventLoop | None = None
    context: contextvars.Context | None = None

    def call(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` in the event loop, in kopf's context (from any thread)."""
        assert self.loop is not None
        assert self.context is not None
        try:
            self.loop.call_soon_threadsafe(callback, *args, context=self.context.copy())
        except RuntimeError:  # the loop is closed: the operator stopped while this sync ran
            log.debug("operator stopped: %s not run", callback.__name__)


@kopf.on.login()
def operator_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """$KUBECONFIG when set (read now: the kubernetes package reads it only at import), else the
    client library's own discovery (in-cluster ServiceAccount, ~/.kube/config)."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
def operator_startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    """Apply the hardened settings and build the client, reconciler and metrics endpoint."""
    config: OperatorConfig = memo.get("config") or from_env()
    memo.config = config
    configure(settings, config)
    memo.reconciler = Reconciler(
        Kube.connect(user_agent=names.OPERATOR_USER_AGENT), config.trainer_image, config.trainer_egress
    )
    # The FineTuneJob handlers queue a key and return; these threads sync (kopf's pool: the sweeps).
    memo.queue = SyncQueue(SYNC_WORKERS, functools.partial(_sync_now, memo))
    memo.loop = _Loop()
    memo.retries = Retries()
    memo.sweeps = SweepReconciler(memo.reconciler.kube)
    memo.metrics = Metrics()
    memo.metrics_server = None
    if config.metrics_port:
        registry = memo.metrics.registry
        memo.metrics_server, _thread = start_http_server(
            config.metrics_port, config.bind_address, registry=registry
        )
    memo.queue.start()
    scope = "all namespaces" if config.clusterwide else ", ".join(config.namespaces)
    logger.info(f"kubetune operator serving {scope}; default trainer image {config.trainer_image}")


@kopf.on.cleanup()
def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the metrics endpoint and the worker threads, and close the API client's connections."""
    retries = memo.get("retries")
    if retries is not None:
        retries.cancel_all()
    queue = memo.get("queue")
    if queue is not None:
        queue.stop()
    server = memo.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()
    reconciler = memo.get("reconciler")
    if reconciler is not None:
        reconciler.kube.close()


def _ask(
    memo: kopf.Memo, label: str, namespace: str | None, name: str | None, body: kopf.Body | None
) -> None:
    """Queue a sync of the FineTuneJob (in the event loop), unless the event in ``body`` brings
    nothing its last sync had not read, or a sync of it is waiting already."""
    if not namespace or not name:  # FineTuneJobs, Jobs and Pods are all namespaced and named
        return
    reconciler: Reconciler = memo.reconciler
    memo.loop.loop = asyncio.get_running_loop()
    memo.loop.context = contextvars.copy_context()  # kopf's, for the Events posted after each sync
    answered = body is not None and reconciler.answered(
        namespace, name, Trigger(body, reconciler.monotonic())
    )
    new = not reconciler.known(namespace, name)  # children to create: before any status update
    if answered or not memo.queue.add((namespace, name), label, new=new):
        memo.metrics.skipped.labels(label).inc()


def _sync_now(memo: kopf.Memo, key: Key, label: str) -> None:
    """One sync, in a queue worker thread; what follows from it runs in the event loop."""
    metrics: Metrics = memo.metrics
    reconciler: Reconciler = memo.reconciler
    started = time.perf_counter()
    outcome: Outcome | Skipped | Exception | None
    try:
        outcome = reconciler.sync(*key)
    except Exception as err:
        metrics.errors.labels(label).inc()
        log.warning("%s/%s: sync failed (%s)", *key, err, exc_info=True)
        outcome = err
    metrics.reconciles.labels(label).inc()
    metrics.duration.labels(label).observe(time.perf_counter() - started)
    memo.loop.call(_after, memo, key, outcome)


def _after(memo: kopf.Memo, key: Key, outcome: Outcome | Skipped | Exception | None) -> None:
    """Events for what a sync did, and a re-sync while the FineTuneJob is held or blocked, when a
    status write was deferred (status patch batching), or after the sync raised."""
    metrics: Metrics = memo.metrics
    retries: Retries = memo.retries

    def again() -> None:
        _ask(memo, "retry", *key, None)

    if isinstance(outcome, Exception):
        retries.schedule(key, retries.failed(key), again)
        return
    if not isinstance(outcome, Outcome):  # gone (a sync with no trigger is never skipped)
        metrics.phases.forget(*key)
        retries.settle(key)
        return
    metrics.phases.set(*key, outcome.after.phase)
    _announce(metrics, outcome)
    delays: list[float | None] = [
        BLOCKED_RETRY_SECONDS if outcome.blocked else None,
        HOLD_RETRY_SECONDS if outcome.hold is not None else None,  # a raised quota may lift it...
        outcome.deferred,
    ]
    if all(due is None for due in delays):
        retries.settle(key)
    for due in delays:
        if due is not None:
            retries.schedule(key, due, again)


def _announce(metrics: Metrics, outcome: Outcome) -> None:
    """Kubernetes Events for what happened to the run: children created (with the phase they
    start in: one Event, not two), a phase entered, a new warning reason within a phase
    (ImagePullBackOff, Unschedulable...). Left to the status (``kubectl get ftj -w``, the
    conditions' lastTransitionTime): a Normal step within a phase (WaitingForPod -> PodStarting,
    Training -> Completing) and the Normal entry into Running, the step every job takes. Each
    Event is a write; with these, a job's whole life is ten (five children, three status patches,
    the Created and the outcome Events)."""
    body = kopf.Body(cast(kopf.RawBody, outcome.ftj))
    before, after = outcome.before, outcome.after
    warning = is_warning(after.phase, after.reason)
    entered = before is None or before.phase != after.phase
    if entered:
        metrics.transitions.labels(after.phase).inc()
    news = entered or (warning and before is not None and before.reason != after.reason)
    state = f"{after.reason}: {after.message}"
    if outcome.created:
        message = f"created {', '.join(outcome.created)}"
        if news and not warning:
            message, news = f"{message}; {after.phase}: {state}", False
        kopf.event(body, type="Normal", reason="Created", message=message[:_EVENT_MESSAGE_LIMIT])
    if news and (warning or after.phase != Phase.RUNNING):
        kind = "Warning" if warning else "Normal"
        kopf.event(body, type=kind, reason=str(after.phase), message=state[:_EVENT_MESSAGE_LIMIT])


@kopf.on.event(*FTJ)
async def finetunejob_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A new FineTuneJob (its children and first status), an edited spec (suspend, cancel,
    lifecycle: align or cancel the Job), the trainer's progress, every watch re-list: resync.
    Not the echo of the operator's own status patch: nothing a sync reads changed."""
    if event.get("type") == "DELETED":
        memo.metrics.phases.forget(namespace or "", name or "")
        memo.reconciler.forget(namespace or "", name or "")
        memo.retries.settle((namespace or "", name or ""))
        return
    _ask(memo, "finetunejob", namespace, name, body)


@kopf.on.event(
    "batch",
    "v1",
    "jobs",
    labels={names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_FINETUNEJOB: kopf.PRESENT},
)
async def job_event(
    body: kopf.Body, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """The trainer Job changed: recompute its FineTuneJob's status."""
    _ask(memo, "job", namespace, labels.get(names.LABEL_FINETUNEJOB), body)


@kopf.on.event(
    "v1", "pods", labels={names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_FINETUNEJOB: kopf.PRESENT}
)
async def pod_event(
    body: kopf.Body, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A trainer pod changed (scheduled, pulling, running, OOMKilled...): recompute status."""
    _ask(memo, "pod", namespace, labels.get(names.LABEL_FINETUNEJOB), body)


# -- FineTuneSweep ---------------------------------------------------------------------------------


def _reconcile_sweep(memo: kopf.Memo, namespace: str | None, name: str | None, *, may_retry: bool) -> None:
    if not namespace or not name:
        return
    sweeps: SweepReconciler = memo.sweeps
    try:
        outcome = sweeps.sync(namespace, name)
    except Exception:
        if may_retry:
            raise  # kopf retries create/resume/update handlers
        logging.getLogger(__name__).exception(
            "sweep %s/%s: sync failed; the next event retries", namespace, name
        )
        return
    if outcome is not None:
        _announce_sweep(outcome)


def _announce_sweep(outcome: SweepOutcome) -> None:
    """Events: trials created, pruned and ended, and the sweep's phase (or reason) changing."""
    body = kopf.Body(cast(kopf.RawBody, outcome.sweep))
    trials = {t["name"]: t for t in (outcome.sweep.get("status") or {}).get("trials") or []}
    for name in outcome.created:
        parameters = (trials.get(name) or {}).get("parameters")
        message = f"trial {name} with {parameters}"[:_EVENT_MESSAGE_LIMIT]
        kopf.event(body, type="Normal", reason=SweepReason.TRIAL_CREATED, message=message)
    for name in outcome.pruned:
        kopf.event(
            body, type="Normal", reason=SweepReason.TRIAL_PRUNED, message=f"trial {name}: spec.cancel: true"
        )
    for name in outcome.ended:
        record = trials.get(name) or {}
        message = (
            f"trial {name} {record.get('state')}: value {record.get('value')} {record.get('message', '')}"
        )
        kopf.event(
            body, type="Normal", reason=SweepReason.TRIAL_ENDED, message=message[:_EVENT_MESSAGE_LIMIT]
        )
    phase, reason, message = outcome.after
    if outcome.before == (phase, reason):
        return
    kind = "Warning" if any(r == reason and r.warning for r in SweepReason) else "Normal"
    kopf.event(body, type=kind, reason=phase, message=f"{reason}: {message}"[:_EVENT_MESSAGE_LIMIT])


@kopf.on.create(*SWEEP)
def finetunesweep_create(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A new FineTuneSweep: create its first trials and its first status."""
    _reconcile_sweep(memo, namespace, name, may_retry=True)


@kopf.on.resume(*SWEEP)
def finetunesweep_resume(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Operator start: adopt the trials that exist, record them, create what maxParallel allows."""
    _reconcile_sweep(memo, namespace, name, may_retry=True)


@kopf.on.update(*SWEEP, field="spec")
def finetunesweep_update(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """maxTrials, maxParallel or the pruner edited: create or prune accordingly."""
    _reconcile_sweep(memo, namespace, name, may_retry=True)


@kopf.on.event(*SWEEP)
def finetunesweep_event(
    event: kopf.RawEvent, namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Any change (and every watch re-list): resync."""
    if event.get("type") == "DELETED":
        memo.sweeps.forget(namespace or "", name or "")
        return
    _reconcile_sweep(memo, namespace, name, may_retry=False)


@kopf.on.event(*FTJ, labels={sweep.LABEL_SWEEP: kopf.PRESENT})
def sweep_trial_event(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trial's FineTuneJob changed (progress, phase): resync its sweep."""
    _reconcile_sweep(memo, namespace, labels.get(sweep.LABEL_SWEEP), may_retry=False)
