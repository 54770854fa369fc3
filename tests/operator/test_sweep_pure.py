"""The operator's pure sweep module (kubetune_operator.sweep), without an API server.

These pin what the level-based reconcile rests on: deterministic trial names, a study rebuilt
from a recorded status that never hands out a running trial again and asks the same for the same
history, the grid's order, the per-trial output, and the pruner's decisions from intermediate
values. The sweep's recorded status is the only input, as after an operator restart.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import optuna
import pytest

from kubetune_api.sweep import FineTuneSweepSpec
from kubetune_operator import sweep

Obj = dict[str, Any]
LR = "training.learningRate"


def spec(**fields: Any) -> FineTuneSweepSpec:
    body: Obj = {
        "template": {
            "model": {"source": "s3://models/tiny-llama"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://results/sweep/"},
            "resources": {"gpus": 0},
        },
        "searchSpace": [{"path": LR, "low": 1e-5, "high": 1e-1, "log": True}],
        "objective": {"metric": "loss"},
        **fields,
    }
    return FineTuneSweepSpec.model_validate(body)


def sweep_body(name: str = "s") -> Obj:
    return {"metadata": {"name": name, "namespace": "team-a", "uid": "uid-1", "generation": 1}}


def record(number: int, state: str, lr: float, value: float | None = None, **extra: Any) -> Obj:
    out: Obj = {"number": number, "name": f"s-{number}", "parameters": {LR: lr}, "state": state, **extra}
    if value is not None:
        out["value"] = value
    return out


def history() -> list[Obj]:
    """Every recorded state: finished, running (with reports), pruned and failed."""
    return [
        record(0, "Succeeded", 1e-3, 0.5),
        record(1, "Succeeded", 1e-2, 1.5),
        record(2, "Pruned", 1e-5, 4.0, intermediateValues=[{"step": 5, "value": 4.0}]),
        record(3, "Failed", 1e-1, message="OOMKilled"),
        record(4, "Running", 3e-4, 0.9, intermediateValues=[{"step": 2, "value": 0.9}]),
        record(5, "Running", 2e-2),
    ]


def test_trial_names_and_outputs_are_deterministic() -> None:
    assert sweep.trial_name("lr-rank", 0) == "lr-rank-0"
    assert sweep.trial_name("lr-rank", 499) == "lr-rank-499"
    assert sweep.trial_output("s3://results/sweep/", "s-3") == "s3://results/sweep/s-3"
    assert sweep.trial_output("s3://results/sweep", "s-3") == "s3://results/sweep/s-3"


def test_build_trial_applies_the_parameters_and_its_own_output() -> None:
    the_spec = spec(
        searchSpace=[{"path": LR, "low": 1e-5, "high": 1e-1}, {"path": "lora.r", "choices": [8, 16]}]
    )
    trial = sweep.build_trial(sweep_body(), the_spec, 7, {LR: 2e-4, "lora.r": 16})
    assert trial["metadata"]["name"] == "s-7"
    assert trial["metadata"]["labels"] == {sweep.LABEL_SWEEP: "s", sweep.LABEL_TRIAL: "7"}
    assert json.loads(trial["metadata"]["annotations"][sweep.ANNOTATION_PARAMETERS]) == {
        LR: 2e-4,
        "lora.r": 16,
    }
    owner = trial["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneSweep", "uid-1", True)
    assert trial["spec"]["training"]["learningRate"] == 2e-4
    assert trial["spec"]["lora"]["r"] == 16
    assert trial["spec"]["output"]["uri"] == "s3://results/sweep/s-7"
    other = sweep.build_trial(sweep_body(), the_spec, 8, {LR: 2e-4, "lora.r": 16})
    assert other["spec"]["output"]["uri"] != trial["spec"]["output"]["uri"]  # never a shared output


def test_the_rebuilt_study_holds_every_recorded_trial_in_its_state() -> None:
    study, running = sweep.rebuild_study(spec(), history(), seed=0)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = [s for s in states if s != optuna.trial.TrialState.RUNNING]
    assert sorted(str(s) for s in finished) == sorted(
        str(s)
        for s in (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL,
        )
    )
    assert set(running) == {"s-4", "s-5"}
    assert running["s-4"].params == {LR: 3e-4}
    assert study.best_value == 0.5
    assert study.best_params == {LR: 1e-3}


def test_next_parameters_never_repeat_a_running_trial_and_repeat_for_the_same_history() -> None:
    study, running = sweep.rebuild_study(spec(), history(), seed=0)
    fresh = study.ask(sweep.distributions(spec()))
    assert fresh.number == len(history())  # the running trials' numbers are taken
    assert fresh.params[LR] not in {h.params[LR] for h in running.values()}  # and not re-enqueued
    for sampler in ("tpe", "random"):
        the_spec = spec(sampler=sampler, seed=11)
        trials = history()
        first = sweep.next_parameters(the_spec, trials, 6)
        assert first == sweep.next_parameters(the_spec, [dict(t) for t in trials], 6)
        assert first is not None
        assert first[LR] not in {t["parameters"][LR] for t in trials if t["state"] == "Running"}
        assert 1e-5 <= float(first[LR]) <= 1e-1
        # A different number (the next trial) gets its own seed: a different ask.
        assert sweep.next_parameters(the_spec, trials, 7) != first


def test_a_different_seed_asks_differently() -> None:
    trials = history()
    asks = {json.dumps(sweep.next_parameters(spec(seed=s), trials, 6)) for s in range(4)}
    assert len(asks) == 4


def test_grid_order_is_shuffled_by_the_seed_and_skips_what_was_tried() -> None:
    space = [{"path": LR, "choices": [1e-4, 1e-3, 1e-2]}, {"path": "lora.r", "choices": [8, 16]}]
    grid_spec = spec(searchSpace=space, sampler="grid", seed=2, maxTrials=20)
    order = sweep.grid(grid_spec)
    assert len(order) == 6
    assert {json.dumps(c, sort_keys=True) for c in order} == {
        json.dumps({LR: lr, "lora.r": r}, sort_keys=True) for lr in (1e-4, 1e-3, 1e-2) for r in (8, 16)
    }
    assert order == sweep.grid(grid_spec)  # same seed, same order
    others = [sweep.grid(spec(searchSpace=space, sampler="grid", seed=s, maxTrials=20)) for s in range(6)]
    assert any(o != order for o in others)
    assert sweep.trial_limit(grid_spec) == 6
    trials: list[Obj] = []
    for number in range(6):
        parameters = sweep.next_parameters(grid_spec, trials, number)
        assert parameters == order[number]
        trials.append({"number": number, "name": f"s-{number}", "parameters": parameters, "state": "Running"})
    assert sweep.next_parameters(grid_spec, trials, 6) is None  # the grid is used up


def median_spec(**pruner: Any) -> FineTuneSweepSpec:
    return spec(pruner={"type": "median", "startupTrials": 1, **pruner})


def points(*pairs: tuple[int, float]) -> list[Obj]:
    return [{"step": s, "value": v} for s, v in pairs]


def test_median_pruner_stops_a_trial_worse_than_the_finished_ones_at_the_same_step() -> None:
    done = record(0, "Succeeded", 1e-3, 0.9, intermediateValues=points((5, 1.0), (10, 0.9)))
    bad = record(1, "Running", 1e-1, 50.0, intermediateValues=points((5, 50.0)))
    good = record(2, "Running", 2e-3, 0.8, intermediateValues=points((5, 0.8)))
    unseen = record(3, "Running", 3e-3, 40.0, intermediateValues=points((3, 40.0)))
    fresh = record(4, "Running", 4e-3)
    assert sweep.to_prune(median_spec(), [done, bad, good, unseen, fresh]) == ["s-1"]
    assert sweep.to_prune(spec(), [done, bad]) == []  # no pruner: nothing stops
    assert sweep.to_prune(median_spec(startupTrials=2), [done, bad]) == []  # too few finished
    assert sweep.to_prune(median_spec(warmupSteps=6), [done, bad]) == []  # still warming up (step 5 < 6)


def test_median_pruner_respects_the_direction() -> None:
    maximize = spec(
        objective={"metric": "loss", "direction": "maximize"}, pruner={"type": "median", "startupTrials": 1}
    )
    done = record(0, "Succeeded", 1e-3, 0.9, intermediateValues=points((5, 1.0)))
    high = record(1, "Running", 1e-1, 50.0, intermediateValues=points((5, 50.0)))
    low = record(2, "Running", 1e-2, 0.1, intermediateValues=points((5, 0.1)))
    assert sweep.to_prune(maximize, [done, high, low]) == ["s-2"]


def test_successive_halving_stops_the_worse_trials_at_a_rung() -> None:
    sh = spec(pruner={"type": "successive-halving", "minResource": 1, "reductionFactor": 2})
    finished = [
        record(n, "Succeeded", 1e-3 * (n + 1), v, intermediateValues=points((1, v)))
        for n, v in enumerate((0.1, 0.2, 0.3, 0.4))
    ]
    worst = record(4, "Running", 5e-2, 9.0, intermediateValues=points((1, 9.0)))
    best_so_far = record(5, "Running", 6e-2, 0.05, intermediateValues=points((1, 0.05)))
    assert sweep.to_prune(sh, [*finished, worst, best_so_far]) == ["s-4"]
    # Judged against the finished trials' rungs, not only the running ones: alone, it is still pruned.
    assert sweep.to_prune(sh, [*finished, worst]) == ["s-4"]
    assert sweep.rung_attrs(sh, {1: 0.3, 2: 0.2, 5: 0.1}) == {
        "completed_rung_0": 0.3,
        "completed_rung_1": 0.2,
        "completed_rung_2": 0.1,
    }
    assert sweep.rung_attrs(spec(), {1: 0.3}) == {}  # no successive halving: no rungs


@pytest.mark.parametrize(
    ("phase", "annotations", "progress", "state"),
    [
        ("Running", {}, {"step": 3, "loss": 1.5}, "Running"),
        ("Succeeded", {}, {"step": 10, "loss": 0.7}, "Succeeded"),
        ("Succeeded", {}, {"step": 10}, "Failed"),
        ("Failed", {}, {}, "Failed"),
        ("Cancelled", {}, {}, "Failed"),
        ("Cancelled", {sweep.ANNOTATION_PRUNED: "true"}, {"step": 4, "loss": 9.0}, "Pruned"),
    ],
)
def test_observe_trial_maps_the_finetunejob_to_a_trial_state(
    phase: str, annotations: Obj, progress: Obj, state: str
) -> None:
    ftj = {
        "metadata": {
            "name": "s-2",
            "labels": {sweep.LABEL_TRIAL: "2"},
            "annotations": {sweep.ANNOTATION_PARAMETERS: json.dumps({LR: 1e-3}), **annotations},
        },
        "status": {"phase": phase, "progress": progress},
    }
    previous = {"intermediateValues": points((1, 3.0))}
    got = sweep.observe_trial(ftj, previous, "loss")
    assert got is not None
    assert (got["number"], got["parameters"], got["state"]) == (2, {LR: 1e-3}, state)
    if "loss" in progress:
        assert got["value"] == progress["loss"]
        assert got["intermediateValues"] == points((1, 3.0), (progress["step"], progress["loss"]))
    else:
        assert "value" not in got


def test_observe_keeps_a_trial_whose_finetunejob_is_gone_and_fails_it_if_it_ran() -> None:
    body = {
        **sweep_body(),
        "status": {"trials": [record(0, "Succeeded", 1e-3, 0.5), record(1, "Running", 1e-2)]},
    }
    trials = sweep.observe(body, [], "loss")
    assert [(t["name"], t["state"]) for t in trials] == [("s-0", "Succeeded"), ("s-1", "Failed")]
    stranger = {
        "metadata": {"name": "s-9", "labels": {sweep.LABEL_TRIAL: "9"}, "ownerReferences": [{"uid": "x"}]}
    }
    assert len(sweep.observe(body, [stranger], "loss")) == 2  # not owned by this sweep: ignored


def test_compute_names_the_best_and_counts() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    the_spec = spec(maxTrials=6)
    status = sweep.compute(sweep_body(), the_spec, history(), now)
    assert (status["phase"], status["trialsRunning"], status["trialsSucceeded"]) == ("Running", 2, 2)
    assert (status["trialsPruned"], status["trialsFailed"], status["trialsSummary"]) == (1, 1, "4/6")
    assert (status["bestTrial"], status["bestValue"], status["bestParameters"]) == ("s-0", 0.5, {LR: 1e-3})
    ended = [t if t["state"] != "Running" else {**t, "state": "Succeeded", "value": 0.2} for t in history()]
    final = sweep.compute(sweep_body(), the_spec, ended, now)
    assert (final["phase"], final["bestTrial"]) == ("Succeeded", "s-4")
    assert sweep.status_patch(final, final) is None
