"""The CLI's pure rendering: durations, ages, steps and the phase line."""

from __future__ import annotations

import datetime

from kubetune_api.reasons import Phase
from kubetune_api.status import FineTuneJobStatus, Progress
from kubetune_client import render


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
