"""kopf handlers: thin, named ``<kind>_<event>``; each one calls :meth:`Reconciler.sync`.

No deletion handlers and no timers or daemons: kopf therefore puts no finalizer on a
FineTuneJob, and deleting one never waits for the operator (owner references let the garbage
collector remove the children). Handler state lives in ``kubetune.dev/*`` annotations.

Run with ``python -m kubetune_operator`` (reads the KUBETUNE_* environment), or
``kopf run -m kubetune_operator.handlers --all-namespaces`` (settings from the same environment).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from kubetune_api import coordinates
from kubetune_api import sweep as sweep_api
from kubetune_api.reasons import is_warning
from kubetune_api.sweep_reasons import SweepReason

from . import names, sweep
from .kube import Kube
from .metrics import Metrics
from .reconcile import Outcome, Reconciler
from .settings import OperatorConfig, configure, from_env
from .sweep_reconcile import SweepOutcome, SweepReconciler

FTJ = (coordinates.GROUP, coordinates.VERSION, coordinates.PLURAL)
SWEEP = (coordinates.GROUP, coordinates.VERSION, sweep_api.PLURAL)
_EVENT_MESSAGE_LIMIT = 1000
#: How soon a held FineTuneJob (a spec that does not parse, a refused child) is tried again.
HOLD_RETRY_SECONDS = 20


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
    memo.reconciler = Reconciler(Kube.connect(), config.trainer_image, config.trainer_egress)
    memo.sweeps = SweepReconciler(memo.reconciler.kube)
    memo.metrics = Metrics()
    memo.metrics_server = None
    if config.metrics_port:
        registry = memo.metrics.registry
        memo.metrics_server, _thread = start_http_server(
            config.metrics_port, config.bind_address, registry=registry
        )
    scope = "all namespaces" if config.clusterwide else ", ".join(config.namespaces)
    logger.info(f"kubetune operator serving {scope}; default trainer image {config.trainer_image}")


@kopf.on.cleanup()
def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the metrics endpoint and close the API client's connections."""
    server = memo.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()
    reconciler = memo.get("reconciler")
    if reconciler is not None:
        reconciler.kube.close()


def _reconcile(
    memo: kopf.Memo,
    trigger: str,
    namespace: str | None,
    name: str | None,
    *,
    ensure_all: bool = False,
    may_retry: bool = False,
) -> None:
    if not namespace or not name:  # FineTuneJobs, Jobs and Pods are all namespaced and named
        return
    metrics: Metrics = memo.metrics
    reconciler: Reconciler = memo.reconciler
    metrics.reconciles.labels(trigger).inc()
    started = time.perf_counter()
    try:
        outcome = reconciler.sync(namespace, name, ensure_all=ensure_all)
    except Exception:
        metrics.errors.labels(trigger).inc()
        raise
    finally:
        metrics.duration.labels(trigger).observe(time.perf_counter() - started)
    if outcome is None:
        metrics.phases.forget(namespace, name)
        return
    metrics.phases.set(namespace, name, outcome.after.phase)
    _announce(metrics, outcome)
    if not may_retry:
        return
    if outcome.blocked:
        # Nothing we watch announces the end of another owner's garbage collection: retry.
        raise kopf.TemporaryError(f"waiting for {', '.join(outcome.blocked)} to be deleted", delay=5)
    if outcome.hold is not None:
        # Retried (kopf posts the error as a Warning Event): a raised quota, an upgraded operator...
        raise kopf.TemporaryError(f"{outcome.hold.reason}: {outcome.hold.message}", delay=HOLD_RETRY_SECONDS)


def _announce(metrics: Metrics, outcome: Outcome) -> None:
    """Kubernetes Events for created children and for phase (or pending-reason) transitions."""
    body = kopf.Body(cast(kopf.RawBody, outcome.ftj))
    if outcome.created:
        kopf.event(body, type="Normal", reason="Created", message=f"created {', '.join(outcome.created)}")
    before, after = outcome.before, outcome.after
    if before is not None and (before.phase, before.reason) == (after.phase, after.reason):
        return
    if before is None or before.phase != after.phase:
        metrics.transitions.labels(after.phase).inc()
    message = f"{after.reason}: {after.message}"[:_EVENT_MESSAGE_LIMIT]
    kind = "Warning" if is_warning(after.phase, after.reason) else "Normal"
    kopf.event(body, type=kind, reason=str(after.phase), message=message)


@kopf.on.create(*FTJ)
def finetunejob_create(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A new FineTuneJob: create its children and its first status."""
    _reconcile(memo, "create", namespace, name, may_retry=True)


@kopf.on.resume(*FTJ)
def finetunejob_resume(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Operator start: adopt what exists, re-create any missing child, recompute status."""
    _reconcile(memo, "resume", namespace, name, ensure_all=True, may_retry=True)


@kopf.on.update(*FTJ, field="spec")
def finetunejob_update(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """suspend, cancel or lifecycle edited (the rest of the spec is immutable): align or cancel the Job."""
    _reconcile(memo, "update", namespace, name, may_retry=True)


@kopf.on.event(*FTJ)
def finetunejob_event(
    event: kopf.RawEvent, namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Any change, including the trainer's progress reports and every watch re-list: resync status."""
    if event.get("type") == "DELETED":
        memo.metrics.phases.forget(namespace or "", name or "")
        memo.reconciler.forget(namespace or "", name or "")
        return
    _reconcile(memo, "finetunejob", namespace, name)


@kopf.on.event(
    "batch",
    "v1",
    "jobs",
    labels={names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_FINETUNEJOB: kopf.PRESENT},
)
def job_event(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """The trainer Job changed: recompute its FineTuneJob's status."""
    _reconcile(memo, "job", namespace, labels.get(names.LABEL_FINETUNEJOB))


@kopf.on.event(
    "v1", "pods", labels={names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_FINETUNEJOB: kopf.PRESENT}
)
def pod_event(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trainer pod changed (scheduled, pulling, running, OOMKilled...): recompute status."""
    _reconcile(memo, "pod", namespace, labels.get(names.LABEL_FINETUNEJOB))


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
