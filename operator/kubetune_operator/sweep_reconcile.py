"""One level-based sync per FineTuneSweep: read its trials, prune, create trials, write status.

Idempotent and safe from any handler, any number of times, before or after a restart: trial
names are deterministic and each FineTuneJob carries its own parameters, so a create that
meets AlreadyExists adopts the trial, and a crash between a create and the status patch loses
nothing (the next sync lists the FineTuneJob).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from kubetune_api import coordinates
from kubetune_api.base import field_errors
from kubetune_api.sweep import PLURAL, FineTuneSweepSpec, InvalidParametersError, check_search_space
from kubetune_api.sweep_reasons import TrialState

from . import sweep
from .kube import FINETUNEJOBS, Kube, KubeError, Resource

log = logging.getLogger(__name__)
SWEEPS: Final = Resource(coordinates.API_VERSION, PLURAL)
#: Refusals a retry cannot fix by itself (a quota, an admission policy): said in status, retried.
REFUSALS: Final = frozenset({400, 403, 422})

Obj = dict[str, Any]


@dataclass(frozen=True)
class SweepOutcome:
    """What one sync saw and did."""

    sweep: Obj
    before: tuple[str, str] | None
    after: tuple[str, str, str]
    created: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    ended: tuple[str, ...] = ()


@dataclass
class SweepReconciler:
    """Reconciles FineTuneSweeps through one :class:`Kube` client."""

    kube: Kube
    clock: Callable[[], datetime.datetime] = field(default=lambda: datetime.datetime.now(datetime.UTC))
    _locks: defaultdict[tuple[str, str], threading.Lock] = field(
        default_factory=lambda: defaultdict(threading.Lock), init=False, repr=False
    )
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)

    def _parse(self, body: Obj) -> tuple[FineTuneSweepSpec | None, str | None]:
        try:
            spec = FineTuneSweepSpec.model_validate(body.get("spec") or {})
            check_search_space(spec)
        except ValidationError as err:
            return None, "the spec does not parse: " + "; ".join(field_errors(err))
        except InvalidParametersError as err:
            return None, str(err)
        return spec, None

    def _prune(self, namespace: str, spec: FineTuneSweepSpec, trials: list[Obj]) -> list[str]:
        pruned = []
        for name in sweep.to_prune(spec, trials):
            try:
                self.kube.patch(FINETUNEJOBS, namespace, name, sweep.prune_patch())
            except KubeError as err:
                if err.status != 404:
                    raise
                continue
            for record in trials:
                if record["name"] == name:
                    record.update(
                        state=TrialState.PRUNED, message="stopped by the pruner (spec.cancel: true)"
                    )
            pruned.append(name)
        return pruned

    def _create(self, body: Obj, spec: FineTuneSweepSpec, trials: list[Obj]) -> tuple[list[str], str | None]:
        running = sum(1 for t in trials if t["state"] == TrialState.RUNNING)
        room = min(spec.max_parallel - running, sweep.trial_limit(spec) - len(trials))
        created: list[str] = []
        for _ in range(max(0, room)):
            number = max((int(t["number"]) for t in trials), default=-1) + 1
            parameters = sweep.next_parameters(spec, trials, number)
            if parameters is None:
                break
            trial = sweep.build_trial(body, spec, number, parameters)
            try:
                actual, was_created = self.kube.ensure(trial)
            except KubeError as err:
                if err.status not in REFUSALS:
                    raise
                return created, f"creating trial {trial['metadata']['name']}: {err.message}"
            record = sweep.observe_trial(actual, None, spec.objective.metric)
            if record is None or not sweep.owned(actual, body):  # a FineTuneJob of someone else
                return (
                    created,
                    f"a FineTuneJob named {trial['metadata']['name']} exists and is no trial of this sweep",
                )
            trials.append(record)
            if was_created:
                created.append(actual["metadata"]["name"])
        return created, None

    def sync(self, namespace: str, name: str) -> SweepOutcome | None:
        """Bring one FineTuneSweep's trials and status in line; None if it is gone or going."""
        with self._lock(namespace, name):
            body = self.kube.get(SWEEPS, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            previous: Obj = body.get("status") or {}
            spec, invalid = self._parse(body)
            metric = spec.objective.metric if spec is not None else "evalLoss"
            ftjs = self.kube.list(FINETUNEJOBS, namespace, f"{sweep.LABEL_SWEEP}={name}")
            trials = sweep.observe(body, ftjs, metric)
            was = {t["name"]: t.get("state") for t in previous.get("trials") or []}
            ended = tuple(
                t["name"]
                for t in trials
                if t["state"] != TrialState.RUNNING and was.get(t["name"]) == TrialState.RUNNING
            )
            created: list[str] = []
            pruned: list[str] = []
            refused: str | None = None
            if spec is not None:
                pruned = self._prune(namespace, spec, trials)
                created, refused = self._create(body, spec, trials)
            if refused:
                log.warning("%s/%s: %s", namespace, name, refused)
            desired = sweep.compute(body, spec, trials, self.clock(), invalid=invalid, refused=refused)
            patch = sweep.status_patch(previous, desired)
            if patch is not None:
                body = self.kube.patch(SWEEPS, namespace, name, {"status": patch}, "status")
            before = (previous["phase"], previous.get("reason", "")) if previous.get("phase") else None
            after = (desired["phase"], desired["reason"], desired["message"])
            return SweepOutcome(body, before, after, tuple(created), tuple(pruned), ended)
