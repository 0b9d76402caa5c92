"""The watchdog: a task past its timeout, or a worker past its memory limit, is reported.

One loop timer per task handed to a worker (``call_at`` on the loop's monotonic clock). It
first waits for the worker's acknowledgement (``AckTimeout``: a healthy worker acks within
microseconds; a SIGSTOPped or wedged one would otherwise hold the task forever, since the
task's own clock starts at the ack); from the ack on it waits for the task's own deadline,
so the queue wait never counts and nothing polls for deadlines. Memory is the exception: RSS
can only be sampled, so while tasks run and ``MaxMemoryMB`` is set, the running workers are
sampled every ``MEMORY_INTERVAL`` seconds (~30 µs per worker with a cached psutil handle).

The watchdog owns its timers and decides nothing else: the broker is called back with the
task, and it is the broker that kills (through the pool) and reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pbt_server.sessions import Task

MEMORY_INTERVAL: Final = 0.05


def deadline(started_at: float, timeout_ms: int) -> float:
    return started_at + timeout_ms / 1000


class Watchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        ack_timeout: float,
        max_memory_mb: int,
        on_timeout: Callable[[Task], None],
        on_no_ack: Callable[[Task], None],
        on_memory: Callable[[Task, int], None],
        sample: Callable[[], Iterable[tuple[Task, int]]],
    ) -> None:
        self.loop = loop
        self.ack_timeout = ack_timeout
        self.limit_bytes = max_memory_mb * 1024 * 1024
        self.on_timeout = on_timeout
        self.on_no_ack = on_no_ack
        self.on_memory = on_memory
        self.sample = sample  # (task, worker RSS) of every task a worker is running
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by job
        self._sampler: asyncio.TimerHandle | None = None

    def expect_ack(self, task: Task) -> None:
        """The task was just handed to a worker: it must be acknowledged within AckTimeout."""
        self.disarm(task)
        self._timers[task.job] = self.loop.call_later(self.ack_timeout, self._fire, task, False)

    def arm(self, task: Task) -> None:
        """The worker acknowledged the task: the task's own timeout runs from its start."""
        assert task.started_at is not None
        self.disarm(task)
        when = deadline(task.started_at, task.timeout_ms)
        self._timers[task.job] = self.loop.call_at(when, self._fire, task, True)
        if self.limit_bytes and self._sampler is None:
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)

    def disarm(self, task: Task) -> None:
        timer = self._timers.pop(task.job, None)
        if timer is not None:
            timer.cancel()

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    def _fire(self, task: Task, acknowledged: bool) -> None:
        del self._timers[task.job]
        (self.on_timeout if acknowledged else self.on_no_ack)(task)

    def _sample(self) -> None:
        self._sampler = None
        running = False
        for task, rss in list(self.sample()):
            running = True
            if rss > self.limit_bytes:
                self.on_memory(task, rss)
        if running:
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)
