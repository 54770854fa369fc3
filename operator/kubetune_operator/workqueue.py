"""When FineTuneJob syncs run: a work queue of FineTuneJob keys, and the timers that re-sync them.

kopf hands over one event at a time per object, but a FineTuneJob has three streams of them (its
own, its Job's, its Pods'), and a burst of them is many more events than syncs are needed: a
sync reads the current state, so one that starts after an event arrived has seen it. The queue
therefore holds keys, not events (controller-runtime's work queue): a key is queued at most once
until a worker takes it; an event for a key being synced marks it to run once more after. The
handlers return at once, so kopf keeps no event body waiting for a worker, and the memory a burst
takes is one key per FineTuneJob, not one object per event.

The timers (:class:`Retries`) queue a key again: a held or blocked FineTuneJob, a deferred status
write, a sync that raised. In memory only: an operator start syncs every FineTuneJob anyway.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Final

Key = tuple[str, str]
#: Runs one sync of a key; ``label`` is what asked for it first (finetunejob, job, pod, retry).
Worker = Callable[[Key, str], None]
#: After a sync that raised (the API server unreachable, a conflict...), by consecutive failure.
ERROR_RETRY_SECONDS: Final = (1, 2, 5, 10, 20, 30, 60)

log = logging.getLogger(__name__)


class SyncQueue:
    """Keys waiting for a sync, first in first out, each at most once; ``workers`` threads run them.

    Keys never synced yet (a new FineTuneJob: its children to create) go first: in a burst of new
    FineTuneJobs every Job is created before the status of any is brought up to date.
    """

    def __init__(self, workers: int, run: Worker) -> None:
        self._run = run
        self._cond = threading.Condition()
        self._new: dict[Key, str] = {}  # insertion-ordered: the queue of keys never synced
        self._waiting: dict[Key, str] = {}  # and of the others
        self._active: set[Key] = set()
        self._again: dict[Key, str] = {}  # asked for while active: queued once it is done
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"sync-{i}", daemon=True) for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Workers finish the sync they run and take no other; waiting keys are dropped."""
        with self._cond:
            self._stopped = True
            self._new.clear()
            self._waiting.clear()
            self._cond.notify_all()

    def add(self, key: Key, label: str, *, new: bool = False) -> bool:
        """Ask for a sync of ``key`` (``new``: never synced); False if one was already waiting
        (this ask is served by it)."""
        with self._cond:
            if key in self._active:
                if key in self._again:
                    return False
                self._again[key] = label
                return True
            if key in self._waiting or key in self._new or self._stopped:
                return False
            (self._new if new else self._waiting)[key] = label
            self._cond.notify()
            return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._new) + len(self._waiting)

    def _take(self) -> tuple[Key, str] | None:
        with self._cond:
            while not self._new and not self._waiting and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            queue = self._new or self._waiting
            key = next(iter(queue))
            label = queue.pop(key)
            self._active.add(key)
            return key, label

    def _done(self, key: Key) -> None:
        with self._cond:
            self._active.discard(key)
            label = self._again.pop(key, None)
            if label is not None and not self._stopped:
                self._waiting[key] = label
                self._cond.notify()

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            key, label = taken
            try:
                self._run(key, label)
            except Exception:  # the worker reports its own failures; this keeps the thread alive
                log.exception("sync of %s/%s failed", *key)
            finally:
                self._done(key)


class Retries:
    """At most one pending re-sync per FineTuneJob, on the event loop's timers (call in the loop).

    A paused replica (kopf peering) may still fire the re-syncs it scheduled before the pause: each
    is one idempotent sync.
    """

    def __init__(self) -> None:
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}

    def schedule(self, key: Key, delay: float, again: Callable[[], object]) -> None:
        """Call ``again`` in ``delay`` seconds, unless a call for ``key`` is due sooner."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(key)
        if pending is not None and pending.when() <= loop.time() + delay:
            return
        if pending is not None:
            pending.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            again()

        self._timers[key] = loop.call_later(delay, fire)

    def failed(self, key: Key) -> float:
        """One more consecutive failure of ``key``: the delay before its next try."""
        count = self._failures.get(key, 0)
        self._failures[key] = count + 1
        return ERROR_RETRY_SECONDS[min(count, len(ERROR_RETRY_SECONDS) - 1)]

    def settle(self, key: Key) -> None:
        """``key`` is reconciled (or gone): no re-sync is due."""
        self._failures.pop(key, None)
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending.cancel()

    def cancel_all(self) -> None:
        for pending in self._timers.values():
            pending.cancel()
        self._timers.clear()
