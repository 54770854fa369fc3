"""``loss.png``: the train loss by step, and the eval loss by step when evaluation ran.

The curve is what a user looks at first to judge a run (did the loss fall, did eval loss turn
up), so it ships in the result and the model card embeds it. It is drawn from the same
histories ``metrics.json`` holds (``lossHistory``, ``evalLossHistory``), so the picture and the
numbers cannot disagree. matplotlib's object-oriented API renders with Agg and never touches
pyplot's global state or a display (the pod has none).

A plot is a convenience: :func:`write` never raises, so a finished training still publishes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The file name in the result, next to ``metrics.json``.
LOSS_PLOT = "loss.png"

History = Sequence[Mapping[str, Any]]


def eval_loss_history(log_history: History) -> list[dict[str, Any]]:
    """``{"step", "loss"}`` for each evaluation in the Trainer's ``log_history``, by step.

    The evaluation after training repeats the last step's when ``evalSteps`` divides the run
    (same weights, same data); one point per step is kept, the latest.
    """
    by_step = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e and "step" in e}
    return [{"step": step, "loss": loss} for step, loss in sorted(by_step.items())]


def draw(path: Path, train: History, evals: History) -> None:
    """Render the curves to ``path`` (PNG). Raises whatever matplotlib or the disk raise."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss", linewidth=1.2)
    if evals:
        steps, losses = [e["step"] for e in evals], [e["loss"] for e in evals]
        ax.plot(steps, losses, label="eval loss", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png")


def write(folder: Path, metrics: Mapping[str, Any]) -> bool:
    """Draw ``folder/loss.png`` from the metrics' histories; whether it was written.

    Nothing logged (``loggingSteps`` above the run's steps) or any failure: no plot, one log
    line, and no stale or half-written file left to be published.
    """
    path = folder / LOSS_PLOT
    train: History = metrics.get("lossHistory") or []
    try:
        if not train:
            log.info("result: no train loss was logged, so no %s", LOSS_PLOT)
        else:
            draw(path, train, metrics.get("evalLossHistory") or [])
            return True
    except Exception as exc:  # a finished training must publish without its plot
        log.warning(
            "result: could not draw %s (%s: %s); publishing without it", LOSS_PLOT, type(exc).__name__, exc
        )
    with contextlib.suppress(OSError):
        path.unlink()
    return False
