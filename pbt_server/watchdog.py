"""The watchdog: a task past its timeout, or a worker past its memory limit, is killed.

One loop timer per running task (``call_at`` on the loop's monotonic clock), armed when the
worker acknowledges the task, so the queue wait never counts (bc-pbt §9 #4) and nothing
polls for deadlines. Memory is the exception: RSS can only be sampled, so while tasks run
and ``MaxMemoryMB`` is set, busy workers are sampled every ``MEMORY_INTERVAL`` seconds
(~30 µs per worker with a cached psutil handle, package-notes §3.1).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final

from pbt_server.pool import Worker, WorkerState

MEMORY_INTERVAL: Final = 0.05
# A healthy worker acknowledges a task within microseconds. One that does not (SIGSTOPped,
# wedged) would hold the task forever, since the task's own clock starts at the ack.
ACK_TIMEOUT: Final = 5.0

Expire = Callable[[Worker, str], None]


def deadline(started_at: float, timeout_ms: int) -> float:
    return started_at + timeout_ms / 1000


def over_limit(workers: Iterable[Worker], limit_bytes: int) -> list[tuple[Worker, int]]:
    """Busy workers whose resident memory exceeds ``limit_bytes``, with their RSS."""
    found = []
    for worker in workers:
        if worker.state is WorkerState.BUSY:
            rss = worker.rss()
            if rss > limit_bytes:
                found.append((worker, rss))
    return found


class Watchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_memory_mb: int,
        on_timeout: Callable[[Worker], None],
        on_memory: Callable[[Worker, int], None],
        on_no_ack: Callable[[Worker], None],
        workers: Callable[[], Iterable[Worker]],
    ) -> None:
        self.loop = loop
        self.limit_bytes = max_memory_mb * 1024 * 1024
        self.on_timeout = on_timeout
        self.on_memory = on_memory
        self.on_no_ack = on_no_ack
        self.workers = workers
        self._sampler: asyncio.TimerHandle | None = None

    def expect_ack(self, worker: Worker) -> None:
        """The worker was just handed a task: it must acknowledge it within ACK_TIMEOUT."""
        self.disarm(worker)
        worker.timer = self.loop.call_later(
            ACK_TIMEOUT, self._unacknowledged, worker, worker.gen, worker.task
        )

    def arm(self, worker: Worker, started_at: float, timeout_ms: int) -> None:
        """The worker acknowledged its task: the task's own timeout runs from now."""
        self.disarm(worker)
        worker.timer = self.loop.call_at(
            deadline(started_at, timeout_ms), self._expired, worker, worker.gen
        )
        if self.limit_bytes and self._sampler is None:
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)

    def disarm(self, worker: Worker) -> None:
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    def _expired(self, worker: Worker, gen: int) -> None:
        worker.timer = None
        if worker.gen == gen and worker.state is WorkerState.BUSY:
            self.on_timeout(worker)

    def _unacknowledged(self, worker: Worker, gen: int, task: object) -> None:
        worker.timer = None
        if worker.gen == gen and worker.state is WorkerState.BUSY and worker.task is task:
            self.on_no_ack(worker)

    def _sample(self) -> None:
        self._sampler = None
        for worker, rss in over_limit(self.workers(), self.limit_bytes):
            self.on_memory(worker, rss)
        if any(w.state is WorkerState.BUSY for w in self.workers()):
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)
