"""The watchdog: a task past its timeout, a worker that does not take its task, or a worker
past its memory limit, is reported.

One loop timer per task handed to a worker (``call_at`` on the loop's monotonic clock); the
worker sends nothing back at the start. ``ACK_POLL`` after the hand-over (or at the task's
deadline, if sooner) the timer asks the pool whether the worker has taken the job off its
pipe (the pipe's unread bytes: a fact the worker's code cannot forge). Taken: the task has
started, its clock runs from the hand-over (a healthy worker takes a job within
microseconds), and the timer is set for its deadline. Not taken yet (a SIGSTOPped or wedged
worker, or a machine too loaded to schedule it): the task has not started, so its timeout
has not begun; the pipe is looked at again every ``ACK_POLL``, and a take seen then starts
the clock there; at ``AckTimeout`` the worker is given up on. Either way the timeout is
exact to ``ACK_POLL``, and the queue wait never counts. A task that ends within
``ACK_POLL``, as most do, takes its one timer with it, unfired.

Memory is the exception: RSS can only be sampled, so while tasks run and ``MaxMemoryMB`` is
set, the running workers are sampled every ``MEMORY_INTERVAL`` seconds (~30 µs per worker
with a cached psutil handle).

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
ACK_POLL: Final = 0.01  # a job not yet taken is looked at this often


def deadline(started_at: float, timeout_ms: int) -> float:
    return started_at + timeout_ms / 1000


class Watchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        ack_timeout: float,
        max_memory_mb: int,
        taken: Callable[[Task], bool],
        on_started: Callable[[Task, float | None], None],
        on_timeout: Callable[[Task], None],
        on_no_ack: Callable[[Task], None],
        on_memory: Callable[[Task, int], None],
        sample: Callable[[], Iterable[tuple[Task, int]]],
    ) -> None:
        self.loop = loop
        self.ack_timeout = ack_timeout
        self.limit_bytes = max_memory_mb * 1024 * 1024
        self.taken = taken  # has the task's worker taken it off its pipe?
        self.on_started = on_started  # (task, the clock's new start if it was taken late)
        self.on_timeout = on_timeout
        self.on_no_ack = on_no_ack
        self.on_memory = on_memory
        self.sample = sample  # (task, worker RSS) of every task a worker is running
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by job
        self._sampler: asyncio.TimerHandle | None = None

    def expect_ack(self, task: Task) -> None:
        """The task was just handed to a worker (``task.started_at``): look ``ACK_POLL``
        later (or at its deadline, or AckTimeout, if sooner) whether the worker took it."""
        assert task.started_at is not None
        self.disarm(task)
        ack_deadline = task.started_at + self.ack_timeout
        first = min(
            task.started_at + ACK_POLL, ack_deadline, deadline(task.started_at, task.timeout_ms)
        )
        self._timers[task.job] = self.loop.call_at(first, self._check, task, ack_deadline, False)
        if self.limit_bytes and self._sampler is None:
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)

    def arm(self, task: Task) -> None:
        """The task has started: its timeout runs out at ``started_at`` + its timeout."""
        assert task.started_at is not None
        self.disarm(task)
        when = deadline(task.started_at, task.timeout_ms)
        self._timers[task.job] = self.loop.call_at(when, self._fire, task)

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

    def _check(self, task: Task, ack_deadline: float, late: bool) -> None:
        del self._timers[task.job]
        now = self.loop.time()
        if self.taken(task):
            self.on_started(task, now if late else None)
            self.arm(task)  # past already if it was taken at once: fires on the next turn
        elif now >= ack_deadline:
            self.on_no_ack(task)
        else:
            when = min(ack_deadline, now + ACK_POLL)
            self._timers[task.job] = self.loop.call_at(when, self._check, task, ack_deadline, True)

    def _fire(self, task: Task) -> None:
        del self._timers[task.job]
        self.on_timeout(task)

    def _sample(self) -> None:
        self._sampler = None
        running = False
        for task, rss in list(self.sample()):
            running = True
            if rss > self.limit_bytes:
                self.on_memory(task, rss)
        if running:
            self._sampler = self.loop.call_later(MEMORY_INTERVAL, self._sample)
