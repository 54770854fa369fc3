"""The CLI's pure rendering: durations, ages, steps and the phase line."""

from __future__ import annotations

import datetime
import json

from kubetune_api.reasons import Phase
from kubetune_api.status import FineTuneJobStatus, Progress
from kubetune_client import render, results


def test_durations_and_ages_read_like_kubectl() -> None:
    assert [render.duration(s) for s in (None, -1, 42.4, 185, 3725)] == ["-", "-", "42s", "3m05s", "1h02m"]
    now = datetime.datetime(2025, 1, 2, tzinfo=datetime.UTC)
    ages = [
        render.age(t, now) for t in ("2025-01-01T23:59:30Z", "2025-01-01T23:35:00Z", "2024-12-31T00:00:00Z")
    ]
    assert ages == ["30s", "25m", "2d"]
    assert render.age(None, now) == "-"


def test_progress_text_and_phase_line() -> None:
    progress = Progress(
        step=420, total_steps=1200, loss=1.13712, eval_loss=None, tokens_per_second=350.4, eta_seconds=185
    )
    assert render.steps(progress) == "420/1200"
    assert render.progress_text(progress) == "loss 1.137  eval -  350 tok/s  ETA 3m05s"
    failed = FineTuneJobStatus(phase=Phase.FAILED, reason="InvalidDataset", message="train.jsonl line 3: ...")
    assert render.phase_line("x", failed) == "x: Failed (InvalidDataset): train.jsonl line 3: ..."
    assert render.phase_line("x", FineTuneJobStatus()) == "x: no phase yet"
    done = FineTuneJobStatus(phase=Phase.SUCCEEDED, reason="Completed", message='{"globalStep": 24}')
    assert render.phase_line("x", done) == "x: Succeeded (Completed)"


def test_loss_history_reads_metrics_and_trainer_state() -> None:
    metrics = {
        "lossHistory": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": "x", "loss": 1}],
        "evalLossHistory": [{"step": 2, "loss": 2.9}, {"step": 2, "loss": 2.8}],  # the final eval repeats
    }
    history = results.history_from_metrics(metrics, "s3://b/out/metrics.json")
    assert history.train == ((1, 3.0), (2, 2.5))
    assert history.eval == ((2, 2.8),)
    log_history = [{"step": 5, "loss": 1.5}, {"step": 5, "eval_loss": 1.7}, {"step": 10, "loss": 1.2}]
    state = json.dumps({"log_history": log_history}).encode()
    from_checkpoint = results.history_from_trainer_state(state, "ckpt")
    assert from_checkpoint.train == ((5, 1.5), (10, 1.2))
    assert from_checkpoint.eval == ((5, 1.7),)
    assert results.history_from_trainer_state(b"not json", "ckpt").train == ()


def test_loss_chart_puts_each_point_where_its_step_and_loss_are() -> None:
    history = results.LossHistory(train=((0, 4.0), (10, 1.0)), eval=((10, 2.0),), source="metrics.json")
    lines = render.loss_chart(history, width=11, height=4).splitlines()
    plot = [line.split("|", 1)[1] for line in lines[:4]]
    assert lines[0].startswith("4 |")  # the highest loss labels the top row, the lowest the bottom
    assert lines[3].startswith("1 |")
    assert plot[0] == "*          "  # step 0, loss 4: top left
    assert plot[3] == "          *"  # step 10, loss 1: bottom right
    assert plot[2] == "          o"  # eval 2.0 at step 10: a third of the way up
    assert "step 0" in lines[5]
    assert lines[5].rstrip().endswith("10")
    assert "o eval loss" in lines[6]
    assert "(from metrics.json)" in lines[6]
    assert render.loss_chart(results.LossHistory((), (), "x")) == "no loss logged yet"
