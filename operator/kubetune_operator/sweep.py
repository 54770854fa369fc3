"""Pure parts of a FineTuneSweep's reconcile: trials from their FineTuneJobs, the Optuna study
rebuilt from them, the next parameters, the trials to prune, the trial FineTuneJob and the status.

No API calls here. The study lives only for one reconcile: it is rebuilt in memory from the trial
records (finished trials added with ``create_trial``, running ones enqueued with their fixed
parameters and asked for, so a new ask never hands out a running trial's number or parameters),
which is why a sweep needs no database and survives any restart. Each new trial number gets its
own sampler seed (``seed`` and the number), so the same history always asks for the same trial.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from kubetune_api import coordinates
from kubetune_api.status import rfc3339
from kubetune_api.sweep import (
    KIND,
    MAX_INTERMEDIATE_VALUES,
    FineTuneSweepSpec,
    Scalar,
    apply_parameters,
)
from kubetune_api.sweep_reasons import (
    FINISHED_TRIAL_STATES,
    SweepConditionType,
    SweepPhase,
    SweepReason,
    TrialState,
)

if TYPE_CHECKING:  # Optuna (and numpy under it) is imported by the first sweep, not at start-up:
    # an operator that serves no sweep stays about 20 MB smaller.
    import optuna
    from optuna.distributions import BaseDistribution

Obj = dict[str, Any]
Body = Mapping[str, Any]

LABEL_SWEEP: Final = f"{coordinates.GROUP}/sweep"
LABEL_TRIAL: Final = f"{coordinates.GROUP}/trial"
#: The trial's parameters as JSON, written with the FineTuneJob (so a crash before the sweep's
#: status is patched loses nothing: the FineTuneJob itself says what it was given).
ANNOTATION_PARAMETERS: Final = f"{coordinates.GROUP}/trial-parameters"
#: Set with spec.cancel in one patch when the pruner stops a trial (a user's cancel has none).
ANNOTATION_PRUNED: Final = f"{coordinates.GROUP}/pruned"
STATUS_FIELDS: Final = (
    "phase",
    "reason",
    "message",
    "observedGeneration",
    "trials",
    "bestTrial",
    "bestValue",
    "bestParameters",
    "trialsSucceeded",
    "trialsRunning",
    "trialsPruned",
    "trialsFailed",
    "trialsSummary",
    "startTime",
    "completionTime",
    "conditions",
)


@functools.cache
def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_name(sweep_name: str, number: int) -> str:
    """The trial's FineTuneJob: ``<sweep>-<number>`` (the CRD caps sweep names so it fits)."""
    return f"{sweep_name}-{number}"


def trial_output(template_uri: str, name: str) -> str:
    return f"{template_uri.rstrip('/')}/{name}"


def build_trial(sweep: Body, spec: FineTuneSweepSpec, number: int, parameters: Mapping[str, Scalar]) -> Obj:
    """The trial's FineTuneJob: the template with the parameters, its own output, owned by the sweep."""
    meta = sweep["metadata"]
    name = trial_name(meta["name"], number)
    job_spec = apply_parameters(spec.template, dict(parameters))
    body: Obj = job_spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["output"]["uri"] = trial_output(spec.template.output.uri, name)
    return {
        "apiVersion": coordinates.API_VERSION,
        "kind": coordinates.KIND,
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {LABEL_SWEEP: meta["name"], LABEL_TRIAL: str(number)},
            "annotations": {ANNOTATION_PARAMETERS: json.dumps(dict(parameters), sort_keys=True)},
            "ownerReferences": [
                {
                    "apiVersion": coordinates.API_VERSION,
                    "kind": KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": body,
    }


def prune_patch() -> Obj:
    """Stop a trial for good and say the pruner did it, in one write."""
    return {"metadata": {"annotations": {ANNOTATION_PRUNED: "true"}}, "spec": {"cancel": True}}


# -- trials from their FineTuneJobs ---------------------------------------------------------------


def owned(ftj: Body, sweep: Body) -> bool:
    uid = sweep["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in ftj["metadata"].get("ownerReferences") or [])


def _merge_intermediate(previous: Sequence[Body], step: Any, value: Any) -> list[Obj]:
    points = {int(p["step"]): float(p["value"]) for p in previous}
    if isinstance(step, int) and isinstance(value, int | float) and not isinstance(value, bool):
        points[step] = float(value)
    ordered = sorted(points.items())[-MAX_INTERMEDIATE_VALUES:]
    return [{"step": s, "value": v} for s, v in ordered]


def observe_trial(ftj: Body, previous: Body | None, metric: str) -> Obj | None:
    """One trial's record from its FineTuneJob (and its previous record: intermediate values
    outlive each observation). None for a FineTuneJob that is no trial (no readable parameters)."""
    meta = ftj["metadata"]
    try:
        number = int((meta.get("labels") or {})[LABEL_TRIAL])
        parameters = json.loads((meta.get("annotations") or {})[ANNOTATION_PARAMETERS])
    except (KeyError, ValueError):
        return None
    status = ftj.get("status") or {}
    progress = status.get("progress") or {}
    value = progress.get(metric)
    intermediate = _merge_intermediate(
        (previous or {}).get("intermediateValues") or [], progress.get("step"), value
    )
    record: Obj = {"number": number, "name": meta["name"], "parameters": parameters}
    phase = status.get("phase")
    pruned = (meta.get("annotations") or {}).get(ANNOTATION_PRUNED) == "true"
    if pruned:
        record.update(state=TrialState.PRUNED, message="stopped by the pruner (spec.cancel: true)")
    elif phase == "Succeeded" and isinstance(value, int | float):
        record.update(state=TrialState.SUCCEEDED, value=float(value))
    elif phase == "Succeeded":
        record.update(state=TrialState.FAILED, message=f"succeeded without reporting {metric}")
    elif phase == "Failed":
        record.update(
            state=TrialState.FAILED,
            message=f"{status.get('reason', 'Failed')}: {status.get('message', '')}"[:1024],
        )
    elif phase == "Cancelled":
        record.update(
            state=TrialState.FAILED, message="cancelled (spec.cancel) by someone other than the pruner"
        )
    else:
        record["state"] = TrialState.RUNNING
    if (
        record["state"] != TrialState.SUCCEEDED
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        record["value"] = float(value)
    if intermediate:
        record["intermediateValues"] = intermediate
    return record


def observe(sweep: Body, ftjs: Sequence[Body], metric: str) -> list[Obj]:
    """Every trial: those whose FineTuneJob exists (owned by this sweep), and those recorded in
    status whose FineTuneJob is gone (kept; a running one is then Failed)."""
    previous = {t["name"]: t for t in (sweep.get("status") or {}).get("trials") or []}
    records: dict[str, Obj] = {}
    for ftj in ftjs:
        if not owned(ftj, sweep):
            continue
        record = observe_trial(ftj, previous.get(ftj["metadata"]["name"]), metric)
        if record is not None:
            records[record["name"]] = record
    for name, old in previous.items():
        if name not in records:
            kept = dict(old)
            if kept.get("state") == TrialState.RUNNING:
                kept.update(state=TrialState.FAILED, message="its FineTuneJob was deleted before it ended")
            records[name] = kept
    return sorted(records.values(), key=lambda t: int(t["number"]))


# -- the study ------------------------------------------------------------------------------------


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if p.choices is not None:
            out[p.path] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            assert p.low is not None
            assert p.high is not None
            out[p.path] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            assert p.low is not None
            assert p.high is not None
            out[p.path] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for asking trial ``number``: fixed by the sweep's seed and the number."""
    return (seed * 1_000_003 + number) % 2**32


def _fits(parameters: Mapping[str, Any], dists: Mapping[str, BaseDistribution]) -> bool:
    try:
        return set(parameters) == set(dists) and all(
            dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in parameters.items()
        )
    except (ValueError, TypeError):
        return False


def rung_attrs(spec: FineTuneSweepSpec, steps: Mapping[int, float]) -> dict[str, Any]:
    """The rungs a recorded trial reached, as Optuna's SuccessiveHalvingPruner stores them on a
    trial (``completed_rung_<r>``: the value it reported at the rung's step or the first after).

    The pruner compares a running trial with these attributes of every other trial; a study rebuilt
    from status would otherwise hold none for the finished trials, and a running trial would be
    judged only against the other running ones.
    """
    if spec.pruner is None or spec.pruner.type != "successive-halving" or not steps:
        return {}
    ordered = sorted(steps.items())
    out: dict[str, Any] = {}
    rung = 0
    while True:
        resource = spec.pruner.min_resource * spec.pruner.reduction_factor**rung
        reached = next((value for step, value in ordered if step >= resource), None)
        if reached is None:
            return out
        out[f"completed_rung_{rung}"] = reached
        rung += 1


def rebuild_study(
    spec: FineTuneSweepSpec, trials: Sequence[Body], seed: int
) -> tuple[optuna.Study, dict[str, optuna.Trial]]:
    """The study of these trial records, in memory; and the running trials, asked and reported."""
    import optuna
    from optuna.trial import TrialState as OptunaState

    _quiet_optuna()
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if spec.sampler == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if spec.pruner is not None and spec.pruner.type == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner.startup_trials, n_warmup_steps=spec.pruner.warmup_steps
        )
    elif spec.pruner is not None:
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.pruner.min_resource, reduction_factor=spec.pruner.reduction_factor
        )
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=sampler,
        pruner=pruner,
        direction=spec.objective.direction,
    )
    dists = distributions(spec)
    running: dict[str, optuna.Trial] = {}
    for record in sorted(trials, key=lambda t: int(t["number"])):
        parameters = record["parameters"]
        if not _fits(parameters, dists):
            continue  # recorded under another search space (cannot happen: it is immutable)
        steps = {int(p["step"]): float(p["value"]) for p in record.get("intermediateValues") or []}
        state = record["state"]
        if state == TrialState.RUNNING:
            study.enqueue_trial(dict(parameters))
            handle = study.ask(dists)
            for step, value in sorted(steps.items()):
                handle.report(value, step)
            running[record["name"]] = handle
            continue
        optuna_state = {
            TrialState.SUCCEEDED: OptunaState.COMPLETE,
            TrialState.PRUNED: OptunaState.PRUNED,
        }.get(state, OptunaState.FAIL)
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna_state,
                value=record.get("value") if optuna_state == OptunaState.COMPLETE else None,
                params=dict(parameters),
                distributions=dists,
                intermediate_values=steps,
                system_attrs=rung_attrs(spec, steps),
            )
        )
    return study, running


def grid(spec: FineTuneSweepSpec) -> list[dict[str, Scalar]]:
    """Every combination of the choices, in an order shuffled by the seed (sampler grid)."""
    paths = [p.path for p in spec.search_space]
    combos = [
        dict(zip(paths, values, strict=True))
        for values in itertools.product(*(p.choices or () for p in spec.search_space))
    ]
    random.Random(spec.seed).shuffle(combos)  # noqa: S311 - an order, not a secret
    return combos


def trial_limit(spec: FineTuneSweepSpec) -> int:
    return min(spec.max_trials, len(grid(spec))) if spec.sampler == "grid" else spec.max_trials


def next_parameters(spec: FineTuneSweepSpec, trials: Sequence[Body], number: int) -> dict[str, Scalar] | None:
    """The parameters of trial ``number`` given every trial so far; None when the grid is used up."""
    if spec.sampler == "grid":
        used = {json.dumps(t["parameters"], sort_keys=True) for t in trials}
        return next((c for c in grid(spec) if json.dumps(c, sort_keys=True) not in used), None)
    study, _running = rebuild_study(spec, trials, trial_seed(spec.seed, number))
    asked = study.ask(distributions(spec))
    return dict(asked.params)


def to_prune(spec: FineTuneSweepSpec, trials: Sequence[Body]) -> list[str]:
    """The running trials the pruner would stop now (by name)."""
    if spec.pruner is None:
        return []
    _study, running = rebuild_study(spec, trials, spec.seed)
    return [name for name, handle in running.items() if handle.should_prune()]


# -- status ---------------------------------------------------------------------------------------


def best(spec: FineTuneSweepSpec, trials: Sequence[Body]) -> Body | None:
    done = [t for t in trials if t["state"] == TrialState.SUCCEEDED and t.get("value") is not None]
    if not done:
        return None
    sign = 1.0 if spec.objective.direction == "minimize" else -1.0
    return min(done, key=lambda t: (sign * float(t["value"]), int(t["number"])))


def _condition(
    previous: Body,
    kind: SweepConditionType,
    *,
    on: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> Obj:
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == kind), None)
    status = "True" if on else "False"
    moment = old["lastTransitionTime"] if old and old.get("status") == status else now
    out: Obj = {
        "type": str(kind),
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": moment,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _phase(
    spec: FineTuneSweepSpec | None,
    trials: Sequence[Body],
    counts: Mapping[TrialState, int],
    top: Body | None,
    *,
    invalid: str | None,
    refused: str | None,
) -> tuple[SweepPhase, SweepReason, str]:
    """The sweep's phase, reason and message: an invalid spec first, then whether every trial has
    ended (with or without a best one), then a refused create, else still running."""
    limit = trial_limit(spec) if spec is not None else len(trials)
    ended = sum(counts[s] for s in FINISHED_TRIAL_STATES)
    if invalid is not None:
        return SweepPhase.FAILED, SweepReason.INVALID_SEARCH_SPACE, invalid
    if len(trials) >= limit and counts[TrialState.RUNNING] == 0 and top is not None:
        metric = spec.objective.metric if spec else "value"
        given = json.dumps(top["parameters"], sort_keys=True)
        return (
            SweepPhase.SUCCEEDED,
            SweepReason.COMPLETED,
            f"best trial {top['name']}: {metric} {top['value']} with {given}",
        )
    if len(trials) >= limit and counts[TrialState.RUNNING] == 0:
        message = f"none of the {len(trials)} trials reported the objective"
        return SweepPhase.FAILED, SweepReason.ALL_TRIALS_FAILED, message
    if refused is not None:
        return SweepPhase.RUNNING, SweepReason.TRIAL_REFUSED, refused
    message = f"{counts[TrialState.RUNNING]} running, {ended} of {limit} ended"
    return SweepPhase.RUNNING, SweepReason.TRIALS_RUNNING, message


def compute(
    sweep: Body,
    spec: FineTuneSweepSpec | None,
    trials: Sequence[Body],
    now: datetime.datetime,
    *,
    invalid: str | None = None,
    refused: str | None = None,
) -> Obj:
    """The sweep's status, from its trials (and the previous status for times)."""
    previous: Body = sweep.get("status") or {}
    generation = sweep["metadata"].get("generation")
    stamp = rfc3339(now)
    counts = {state: sum(1 for t in trials if t["state"] == state) for state in TrialState}
    ended = sum(counts[s] for s in FINISHED_TRIAL_STATES)
    limit = trial_limit(spec) if spec is not None else len(trials)
    top = best(spec, trials) if spec is not None else None
    phase, reason, message = _phase(spec, trials, counts, top, invalid=invalid, refused=refused)
    terminal = phase != SweepPhase.RUNNING
    out: Obj = {
        "phase": str(phase),
        "reason": str(reason),
        "message": message[:4096],
        "trials": [dict(t) for t in trials],
        "trialsSucceeded": counts[TrialState.SUCCEEDED],
        "trialsRunning": counts[TrialState.RUNNING],
        "trialsPruned": counts[TrialState.PRUNED],
        "trialsFailed": counts[TrialState.FAILED],
        "trialsSummary": f"{ended}/{limit}",
    }
    if generation is not None:
        out["observedGeneration"] = generation
    if top is not None:
        out.update(bestTrial=top["name"], bestValue=top["value"], bestParameters=dict(top["parameters"]))
    if trials:
        out["startTime"] = previous.get("startTime") or stamp
    if terminal:
        out["completionTime"] = previous.get("completionTime") or stamp
    out["conditions"] = [
        _condition(
            previous,
            kind,
            on=phase == want,
            reason=str(reason),
            message=message,
            now=stamp,
            generation=generation,
        )
        for kind, want in (
            (SweepConditionType.RUNNING, SweepPhase.RUNNING),
            (SweepConditionType.SUCCEEDED, SweepPhase.SUCCEEDED),
            (SweepConditionType.FAILED, SweepPhase.FAILED),
        )
    ]
    return out


def status_patch(previous: Body | None, desired: Body) -> Obj | None:
    """A merge patch turning ``previous`` into ``desired`` (None: nothing changed)."""
    previous = previous or {}
    changes: Obj = {}
    for key in STATUS_FIELDS:
        if key in desired:
            if previous.get(key) != desired[key]:
                changes[key] = desired[key]
        elif key in previous:
            changes[key] = None
    return changes or None
