"""Pure rendering of a FineTuneSweep for the CLI: its summary rows, its trials table, a list row
and the one line printed per change while following it. No client and no I/O."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from kubetune_api.sweep import FineTuneSweepStatus, Scalar, TrialStatus

from .render import NONE, age, number
from .sweep import Sweep


def parameters_text(parameters: Mapping[str, Scalar] | None) -> str:
    """``{"training.learningRate": 0.0003, "lora.r": 16}`` -> ``"learningRate=0.0003 r=16"``:
    the leaf of each path (the section is in the sweep's spec), numbers with 4 significant digits."""
    if not parameters:
        return NONE
    shown = []
    for path, value in sorted(parameters.items()):
        text = f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
        shown.append(f"{path.rsplit('.', 1)[-1]}={text.strip(chr(34))}")
    return " ".join(shown)


def counts_text(status: FineTuneSweepStatus) -> str:
    """``"3/12 ended: 2 succeeded, 1 pruned, 0 failed; 3 running"``."""
    return (
        f"{status.trials_summary or NONE} ended: {status.trials_succeeded or 0} succeeded, "
        f"{status.trials_pruned or 0} pruned, {status.trials_failed or 0} failed; "
        f"{status.trials_running or 0} running"
    )


def sweep_line(sweep: Sweep) -> str:
    """``"lr: Running (TrialsRunning) 3/12 ended ...; best 0.71 (lr-1)"``: printed on each change."""
    status = sweep.status
    reason = f" ({status.reason})" if status.reason else ""
    best = f"; best {number(status.best_value)} ({status.best_trial})" if status.best_trial else ""
    return f"{sweep.name}: {status.phase or 'no phase yet'}{reason} {counts_text(status)}{best}"


def summary_rows(sweep: Sweep) -> list[tuple[str, str]]:
    """``kubetune sweep status NAME``: the sweep's own fields, one (field, value) pair per line."""
    status, spec = sweep.status, sweep.resource.spec
    return [
        ("Name", f"{sweep.namespace}/{sweep.name}"),
        ("Phase", str(status.phase or NONE)),
        ("Reason", status.reason or NONE),
        ("Message", status.message or NONE),
        ("Objective", f"{spec.objective.direction} {spec.objective.metric}"),
        ("Sampler", f"{spec.sampler} (seed {spec.seed}), {spec.max_parallel} at a time"),
        ("Trials", counts_text(status)),
        ("Best trial", status.best_trial or NONE),
        ("Best value", number(status.best_value)),
        ("Best parameters", parameters_text(status.best_parameters)),
    ]


TRIAL_COLUMNS = ("TRIAL", "PARAMETERS", "STATE", "VALUE", "MESSAGE")


def trial_row(trial: TrialStatus, best: str | None) -> list[str]:
    mark = " *" if trial.name == best else ""
    return [
        trial.name + mark,
        parameters_text(trial.parameters),
        str(trial.state),
        number(trial.value),
        trial.message or "",
    ]


def trials_table(trials: Sequence[TrialStatus], best: str | None) -> Table:
    """Every trial by number; the best one marked ``*``."""
    table = Table(box=None, pad_edge=False)
    for column in TRIAL_COLUMNS:
        table.add_column(column, no_wrap=column != "MESSAGE")
    for trial in trials:
        table.add_row(*trial_row(trial, best))
    return table


SWEEP_COLUMNS = ("NAME", "PHASE", "TRIALS", "RUNNING", "BEST", "BEST TRIAL", "AGE")


def sweep_row(sweep: Sweep, namespace: bool = False, now: datetime.datetime | None = None) -> list[str]:
    status = sweep.status
    row = [
        sweep.name,
        str(status.phase or NONE),
        status.trials_summary or NONE,
        str(status.trials_running or 0),
        number(status.best_value),
        status.best_trial or NONE,
        age(sweep.raw.get("metadata", {}).get("creationTimestamp"), now),
    ]
    return [sweep.namespace, *row] if namespace else row


def sweeps_table(sweeps: Sequence[Sweep], namespace: bool = False) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("NAMESPACE", *SWEEP_COLUMNS) if namespace else SWEEP_COLUMNS:
        table.add_column(column, no_wrap=column in ("NAME", "NAMESPACE"))
    for sweep in sweeps:
        table.add_row(*sweep_row(sweep, namespace))
    return table


def sweep_json(sweep: Sweep) -> dict[str, Any]:
    """The FineTuneSweep as the API server returned it (``kubectl get -o json``'s object)."""
    return sweep.raw
