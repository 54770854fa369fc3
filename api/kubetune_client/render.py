"""Pure rendering for the CLI: a job's state as table rows, short numbers and phase lines.

No client and no I/O: each function maps API values (``kubetune_api`` models) to strings or
rich renderables, so the CLI stays a thin layer and these are easy to reason about.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from kubetune_api.reasons import Phase
from kubetune_api.status import FineTuneJobStatus, Progress

from .job import Job
from .results import Checkpoint, LossHistory

NONE = "-"


def duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h02m"``, ``185`` -> ``"3m05s"``, ``42.4`` -> ``"42s"``."""
    if seconds is None or seconds < 0:
        return NONE
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def number(value: float | None, digits: int = 4) -> str:
    """A metric with ``digits`` significant digits, or ``-``."""
    return NONE if value is None else f"{value:.{digits}g}"


def age(created: str | None, now: datetime.datetime | None = None) -> str:
    """How long ago an RFC 3339 timestamp was, as kubectl's AGE column says it (``25m``, ``3h``, ``2d``)."""
    if not created:
        return NONE
    then = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    seconds = ((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds()
    if seconds < 120:
        return f"{max(0, int(seconds))}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m"
    if seconds < 172800:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def steps(progress: Progress) -> str:
    if progress.step is None:
        return NONE
    return f"{progress.step}/{progress.total_steps}" if progress.total_steps else str(progress.step)


def progress_fields(progress: Progress) -> dict[str, str]:
    """The live numbers the progress bar shows next to the bar."""
    return {
        "loss": number(progress.loss),
        "eval_loss": number(progress.eval_loss),
        "tokens_per_second": NONE
        if progress.tokens_per_second is None
        else f"{progress.tokens_per_second:.0f}",
        "eta": duration(progress.eta_seconds),
    }


def progress_text(progress: Progress) -> str:
    """``"loss 1.137  eval 1.2  350 tok/s  ETA 3m05s"``: the numbers next to the progress bar."""
    fields = progress_fields(progress)
    return (
        f"loss {fields['loss']}  eval {fields['eval_loss']}  {fields['tokens_per_second']} tok/s  "
        f"ETA {fields['eta']}"
    )


def phase_line(name: str, status: FineTuneJobStatus) -> str:
    """``"tiny-chat: Running (Training): training (attempt 1)"``: with the message, a failure's cause;
    not for Succeeded, whose message is the trainer's JSON summary (``kubetune status`` shows it)."""
    reason = f" ({status.reason})" if status.reason else ""
    shown = status.message and status.phase is not Phase.SUCCEEDED
    message = f": {status.message}" if shown else ""
    return f"{name}: {status.phase or 'no phase yet'}{reason}{message}"


JOB_COLUMNS = ("NAME", "PHASE", "PROGRESS", "LOSS", "EVAL LOSS", "REASON", "AGE")


def job_row(job: Job, namespace: bool = False, now: datetime.datetime | None = None) -> list[str]:
    status, progress = job.status, job.progress
    row = [
        job.name,
        str(status.phase or NONE),
        steps(progress),
        number(progress.loss),
        number(progress.eval_loss),
        status.reason or NONE,
        age(job.raw.get("metadata", {}).get("creationTimestamp"), now),
    ]
    return [job.namespace, *row] if namespace else row


def jobs_table(jobs: Sequence[Job], namespace: bool = False) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("NAMESPACE", *JOB_COLUMNS) if namespace else JOB_COLUMNS:
        table.add_column(column, no_wrap=column in ("NAME", "NAMESPACE"))
    for job in jobs:
        table.add_row(*job_row(job, namespace))
    return table


def status_rows(job: Job) -> list[tuple[str, str]]:
    """``kubetune status NAME``: one (field, value) pair per line."""
    status, progress = job.status, job.progress
    rows = [
        ("Name", f"{job.namespace}/{job.name}"),
        ("Phase", str(status.phase or NONE)),
        ("Reason", status.reason or NONE),
        ("Message", status.message or NONE),
        ("Step", steps(progress)),
        ("Epoch", number(progress.epoch, 3)),
        ("Loss", number(progress.loss)),
        ("Eval loss", number(progress.eval_loss)),
        ("Tokens/s", progress_fields(progress)["tokens_per_second"]),
        ("ETA", duration(progress.eta_seconds)),
        ("Last checkpoint", progress.last_checkpoint or NONE),
        ("Output", job.output_uri),
        ("Attempts", NONE if status.attempts is None else str(status.attempts)),
    ]
    rows += [(f"Condition {c.type}", f"{c.status} ({c.reason})") for c in status.conditions or ()]
    return rows


def key_value_table(rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def checkpoints_table(checkpoints: Sequence[Checkpoint]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("STEP", "LOSS", "EVAL LOSS", "EPOCH", "SAVED", "URI"):
        table.add_column(column, no_wrap=column == "URI")
    for ckpt in checkpoints:
        saved = ckpt.saved_at.strftime("%Y-%m-%d %H:%M:%S") if ckpt.saved_at else NONE
        table.add_row(
            str(ckpt.step), number(ckpt.loss), number(ckpt.eval_loss), number(ckpt.epoch, 3), saved, ckpt.uri
        )
    return table


def job_json(job: Job) -> dict[str, Any]:
    """The FineTuneJob as the API server returned it (``kubectl get -o json``'s object)."""
    return job.raw


def loss_chart(history: LossHistory, width: int = 60, height: int = 12) -> str:
    """Train (``*``) and eval (``o``) loss by step as a text chart, y labelled with the loss range,
    x with the first and last step. Each column shows the last point that falls into it.

    Hand-written (about 30 lines) rather than a plotting dependency for the CLI.
    """
    points = history.train + history.eval
    if not points:
        return "no loss logged yet"
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    span_x, span_y = max(last - first, 1), (high - low) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for series, mark in ((history.train, "*"), (history.eval, "o")):
        for step, value in series:
            column = round((step - first) / span_x * (width - 1))
            row = round((high - value) / span_y * (height - 1))
            grid[row][column] = mark
    label_width = max(len(f"{high:.4g}"), len(f"{low:.4g}"))
    lines = []
    for row, cells in enumerate(grid):
        label = f"{high:.4g}" if row == 0 else f"{low:.4g}" if row == height - 1 else ""
        lines.append(f"{label:>{label_width}} |{''.join(cells)}")
    lines.append(f"{'':>{label_width}} +{'-' * width}")
    axis = f"step {first}".ljust(width - len(str(last))) + str(last)
    lines.append(f"{'':>{label_width}}  {axis}")
    legend = "* train loss" + ("   o eval loss" if history.eval else "")
    lines.append(f"{'':>{label_width}}  {legend}   (from {history.source})")
    return "\n".join(lines)
