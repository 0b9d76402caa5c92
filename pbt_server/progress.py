"""Progress relay: the latest ``ctx.set_progress`` value of each running task, to its page at
most once per ``[AsynchronousProcessing] ProgressInterval``.

A value that arrives within the interval after the last one sent waits for the interval's
end and is replaced by any later one (only the latest is kept). A client that does not read
(its connection holds more than :data:`BACKLOG` unsent bytes) gets no progress until it has
caught up: the value waits, it is not queued. :meth:`ProgressRelay.forget` is called before
a task's outcome is sent, so no progress ever follows an outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pbt_server.sessions import Task

BACKLOG: Final = 64 << 10  # unsent bytes beyond which a connection gets no progress


@dataclass(slots=True)
class _Latest:
    progress: dict[str, str]
    sent_at: float = float("-inf")
    timer: asyncio.TimerHandle | None = None


class ProgressRelay:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float,
        send: Callable[[Task, dict[str, str]], bool],
    ) -> None:
        """``send(task, progress)`` delivers, or returns False when the client is behind."""
        self.loop = loop
        self.interval = interval
        self.send = send
        self._tasks: dict[Task, _Latest] = {}

    def update(self, task: Task, progress: dict[str, str]) -> None:
        latest = self._tasks.get(task)
        if latest is None:
            latest = self._tasks[task] = _Latest(progress)
        latest.progress = progress
        if latest.timer is None:
            due = latest.sent_at + self.interval - self.loop.time()
            if due <= 0:
                self._flush(task)
            else:
                latest.timer = self.loop.call_later(due, self._flush, task)

    def forget(self, task: Task) -> None:
        """The task has ended: drop its progress (before its outcome goes out)."""
        latest = self._tasks.pop(task, None)
        if latest is not None and latest.timer is not None:
            latest.timer.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

    def _flush(self, task: Task) -> None:
        latest = self._tasks.get(task)
        if latest is None:
            return
        latest.timer = None
        if self.send(task, latest.progress):
            latest.sent_at = self.loop.time()
        else:  # the client is behind: try again an interval later, with what is latest then
            latest.timer = self.loop.call_later(self.interval, self._flush, task)
