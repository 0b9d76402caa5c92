"""The child session a codeunit receives as ``ctx``."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.database import Database


@dataclass(frozen=True, slots=True, eq=False)
class ChildSession:
    """What a codeunit sees of its task: read-only, no UI, text in and text out.

    Attributes:
        parameters: the task's parameters (read-only mapping of str to str).
        db: the worker's database connection, read-only at the database level.
        task_id: the TaskId the page got from ``enqueue_background_task``.
        session_id: the parent session's id.
        record_id: the page's record id when the task was enqueued.
        codeunit_id: the id this codeunit was registered under.
        deadline: ``time.monotonic()`` value at which the watchdog kills the task.
        log: a logger whose records reach the server log.
    """

    parameters: Mapping[str, str]
    db: Database
    task_id: int
    session_id: int
    record_id: str
    codeunit_id: int
    deadline: float
    log: logging.Logger

    def remaining(self) -> float:
        """Seconds left before the watchdog kills this task."""
        return self.deadline - time.monotonic()
