"""The operator's work queue and re-sync timers (workqueue): one waiting sync per FineTuneJob,
one more for a key asked for while it syncs; one pending re-sync per key, the sooner wins."""

from __future__ import annotations

import asyncio
import threading
import time

from kubetune_operator.workqueue import ERROR_RETRY_SECONDS, Key, Retries, SyncQueue


def test_a_key_waits_once_and_runs_once_more_if_asked_while_it_syncs() -> None:
    runs: list[tuple[Key, str]] = []
    release = threading.Event()
    started = threading.Event()

    def run(key: Key, label: str) -> None:
        runs.append((key, label))
        if key == ("ns", "slow") and len(runs) == 1:
            started.set()
            release.wait(10)

    queue = SyncQueue(1, run)
    assert queue.add(("ns", "slow"), "finetunejob")
    queue.start()
    assert started.wait(10)
    # Asked while it syncs: once more after, however many times; other keys wait their turn, once.
    assert queue.add(("ns", "slow"), "pod")
    assert not queue.add(("ns", "slow"), "job")
    assert queue.add(("ns", "other"), "job")
    assert not queue.add(("ns", "other"), "pod")
    assert len(queue) == 1
    release.set()
    deadline = time.monotonic() + 10
    while len(runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.stop()
    assert runs == [(("ns", "slow"), "finetunejob"), (("ns", "other"), "job"), (("ns", "slow"), "pod")]


def test_keys_never_synced_go_first() -> None:
    runs: list[Key] = []
    queue = SyncQueue(1, lambda key, label: runs.append(key))
    queue.add(("ns", "known-1"), "pod")
    queue.add(("ns", "known-2"), "job")
    queue.add(("ns", "new-1"), "finetunejob", new=True)
    queue.add(("ns", "new-2"), "finetunejob", new=True)
    assert not queue.add(("ns", "new-2"), "job")
    queue.start()
    deadline = time.monotonic() + 10
    while len(runs) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.stop()
    assert runs == [("ns", "new-1"), ("ns", "new-2"), ("ns", "known-1"), ("ns", "known-2")]


def test_a_failing_sync_does_not_stop_its_worker() -> None:
    done = threading.Event()

    def run(key: Key, label: str) -> None:
        if key == ("ns", "bad"):
            raise RuntimeError("boom")
        done.set()

    queue = SyncQueue(1, run)
    queue.start()
    queue.add(("ns", "bad"), "job")
    queue.add(("ns", "good"), "job")
    assert done.wait(10)
    queue.stop()
    assert not queue.add(("ns", "late"), "job")  # stopped: nothing is queued


def test_one_pending_resync_per_finetunejob_and_the_sooner_wins() -> None:
    fired: list[str] = []

    async def scenario() -> None:
        retries = Retries()
        retries.schedule(("ns", "a"), 30, lambda: fired.append("a-late"))
        retries.schedule(("ns", "a"), 0.01, lambda: fired.append("a-soon"))
        retries.schedule(("ns", "a"), 20, lambda: fired.append("a-later"))
        retries.schedule(("ns", "b"), 0.01, lambda: fired.append("b"))
        retries.schedule(("ns", "c"), 0.01, lambda: fired.append("c"))
        retries.settle(("ns", "c"))  # reconciled meanwhile: nothing is due
        await asyncio.sleep(0.2)
        retries.cancel_all()

    asyncio.run(scenario())
    assert sorted(fired) == ["a-soon", "b"]


def test_failures_back_off_and_a_success_resets() -> None:
    retries = Retries()
    key = ("ns", "flaky")
    delays = [retries.failed(key) for _ in range(len(ERROR_RETRY_SECONDS) + 2)]
    assert delays[: len(ERROR_RETRY_SECONDS)] == list(ERROR_RETRY_SECONDS)
    assert delays[-1] == ERROR_RETRY_SECONDS[-1]
    retries.settle(key)
    assert retries.failed(key) == ERROR_RETRY_SECONDS[0]
