"""Progress reporting: throttling and failure tolerance, and a real patch of FineTuneJob status."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.coordinates import GROUP, PLURAL, VERSION
from kubetune_api.trainer import ReportingSpec
from kubetune_trainer.reporting import (
    JobRef,
    ProgressReporter,
    job_ref,
    status_patcher,
    write_termination_message,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reporter_sends_at_most_once_per_interval() -> None:
    sent: list[dict[str, Any]] = []
    clock = Clock()
    reporter = ProgressReporter(send=sent.append, interval=5.0, clock=clock)
    assert reporter.update({"step": 1, "loss": 2.0})
    clock.now += 1
    assert not reporter.update({"step": 2, "loss": 1.5})
    clock.now += 5
    assert reporter.update({"step": 3, "evalLoss": None})
    assert [s["step"] for s in sent] == [1, 3]
    assert sent[1]["loss"] == 1.5  # the latest values are merged in, None values are not sent
    assert "evalLoss" not in sent[1]
    assert sent[1]["updateTime"].endswith("Z")
    assert reporter.update({"step": 4}, force=True)


def test_reporting_failures_are_logged_once_and_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_progress: dict[str, Any]) -> None:
        raise ConnectionError("apiserver unreachable")

    reporter = ProgressReporter(send=broken, interval=0.0)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            assert not reporter.update({"step": step})
    assert sum("could not patch" in r.message for r in caplog.records) == 1


def test_reporting_that_works_again_is_logged_with_the_failures_and_a_new_outage_is_logged_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API server restart: one warning when patches start failing, one line when they work again."""
    up = [False]
    sent: list[dict[str, Any]] = []

    def send(progress: dict[str, Any]) -> None:
        if not up[0]:
            raise ConnectionError("apiserver unreachable")
        sent.append(progress)

    reporter = ProgressReporter(send=send, interval=0.0)
    with caplog.at_level(logging.INFO, logger="kubetune_trainer.reporting"):
        for step in range(3):
            assert not reporter.update({"step": step})
        up[0] = True
        assert reporter.update({"step": 3})
        assert reporter.update({"step": 4})
        up[0] = False
        assert not reporter.update({"step": 5})
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not patch" in m for m in messages) == 2  # once per outage
    assert [m for m in messages if "patched again" in m] == [
        "progress: the FineTuneJob status is patched again, after 3 failed attempt(s)"
    ]
    assert [s["step"] for s in sent] == [3, 4]


def test_a_field_status_does_not_know_is_dropped_and_the_rest_is_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[dict[str, Any]] = []
    reporter = ProgressReporter(send=sent.append, interval=0.0)
    with caplog.at_level(logging.WARNING):
        assert reporter.update({"step": 1, "stepz": 2})
        assert reporter.update({"step": 2, "stepz": 3})
    assert [s["step"] for s in sent] == [1, 2]
    assert all("stepz" not in s for s in sent)
    assert caplog.text.count("has no field stepz") == 1


def test_job_ref_from_config_or_environment() -> None:
    assert job_ref(ReportingSpec(), {}) is None
    assert job_ref(ReportingSpec(), {"KUBETUNE_JOB_NAME": "a", "KUBETUNE_JOB_NAMESPACE": "ns"}) == JobRef(
        "ns", "a"
    )
    assert job_ref(ReportingSpec(name="b", namespace="x"), {"KUBETUNE_JOB_NAME": "a"}) == JobRef("x", "b")


def test_termination_message_stays_under_4kib_and_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    history = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(500)]
    write_termination_message(str(path), {"phase": "Succeeded", "globalStep": 500, "lossHistory": history})
    data = path.read_bytes()
    assert len(data) < 4096
    assert json.loads(data) == {"phase": "Succeeded", "globalStep": 500}


@pytest.mark.cluster
def test_status_patcher_writes_progress_to_the_real_apiserver(
    finetunejob: JobRef, local_env: Any, kube_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client

    monkeypatch.setenv("KUBECONFIG", str(local_env.kubeconfig))
    reporter = ProgressReporter(send=status_patcher(finetunejob), interval=0.5)
    assert reporter.update({"step": 3, "totalSteps": 10, "loss": 1.25, "learningRate": 0.0002, "epoch": 0.3})
    assert reporter.update(
        {"step": 4, "lastCheckpoint": "s3://out/progress-test/checkpoints/step-4"}, force=True
    )
    obj: Any = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, finetunejob.namespace, PLURAL, finetunejob.name
    )
    progress = obj["status"]["progress"]
    assert progress["step"] == 4
    assert progress["totalSteps"] == 10
    assert progress["loss"] == 1.25
    assert progress["lastCheckpoint"].endswith("step-4")
    assert progress["updateTime"].endswith("Z")


def test_rates_count_only_the_time_spent_in_steps() -> None:
    from kubetune_trainer.reporting import TrainingRates

    clock = Clock()
    rates = TrainingRates(clock=clock)
    rates.begin(step=0, tokens=0)
    for _ in range(4):  # 4 steps of 2 s, each followed by a 30 s evaluation or checkpoint upload
        rates.step_begin()
        clock.now += 2
        rates.step_end()
        clock.now += 30
    assert rates.rates(step=4, max_steps=10, tokens=800) == {"tokensPerSecond": 100.0, "etaSeconds": 12}
    assert TrainingRates(clock=clock).rates(step=0, max_steps=10, tokens=0) == {
        "tokensPerSecond": None,
        "etaSeconds": None,
    }


def test_the_final_evaluation_is_reported_even_right_after_a_log() -> None:
    from types import SimpleNamespace

    from kubetune_trainer.reporting import make_progress_callback

    sent: list[dict[str, Any]] = []
    clock = Clock()
    reporter = ProgressReporter(send=sent.append, interval=60.0, clock=clock)
    callback = make_progress_callback(reporter, lambda: None)
    state = SimpleNamespace(
        global_step=10, max_steps=10, epoch=1.0, num_input_tokens_seen=0, is_world_process_zero=True
    )
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.5})  # within the interval: not sent
    callback.on_evaluate(None, state, None, metrics={"eval_loss": 1.23456})
    assert sent[-1]["evalLoss"] == 1.2346
    assert sent[-1]["loss"] == 1.5
