"""The broker's log events: a stable id per kind of event, and the fields it carries.

In ``[Server] LogFormat = json`` every line is one JSON object, and each task event carries
``event`` (an id below), ``session``, ``page``, ``task``, ``codeunit`` and, where they apply,
``wait_ms``, ``run_ms``, ``code`` and ``worker``, so that Loki, Elastic or Application
Insights can count and join them (Business Central's telemetry signals carry ids the same
way). In the text format the same events are plain lines. :func:`render_markdown` renders
the README's table.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pbt_server.sessions import Task


class Event(StrEnum):
    """Event ids. Never reused; a new kind of event gets the next number."""

    ENQUEUED = "PBT0001"
    STARTED = "PBT0002"
    COMPLETED = "PBT0003"
    FAILED = "PBT0004"
    CANCELLED = "PBT0005"
    TIMED_OUT = "PBT0006"
    CRASHED = "PBT0007"
    REQUEUED = "PBT0008"
    MEMORY_KILLED = "PBT0009"
    WORKER_RETIRED = "PBT0010"
    PROTOCOL_FAULT = "PBT0011"
    SESSION_OPENED = "PBT0012"
    SESSION_CLOSED = "PBT0013"
    SUMMARY = "PBT0020"
    READY = "PBT0030"
    STOPPING = "PBT0031"
    RELOADED = "PBT0032"
    RELOAD_FAILED = "PBT0033"
    TAKEN = "PBT0034"

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    Event.ENQUEUED: "a task was accepted (DEBUG)",
    Event.STARTED: "a task was handed to a worker: its timeout runs from here (DEBUG)",
    Event.COMPLETED: "a task completed; `wait_ms`, `run_ms` (DEBUG)",
    Event.FAILED: "a task's codeunit failed; `code` (INFO)",
    Event.CANCELLED: (
        "a task was cancelled; `code` is the reason (INFO; DEBUG for record changes and"
        " page closes)"
    ),
    Event.TIMED_OUT: "a task ran past its timeout; its worker was killed (WARNING, with the stack)",
    Event.CRASHED: "a task's worker died; `code` ChildSessionCrashed (WARNING)",
    Event.REQUEUED: (
        "a task's worker died, or was given up on, before taking it: it runs elsewhere (WARNING)"
    ),
    Event.MEMORY_KILLED: "a task's worker went over MaxMemoryMB and was killed (WARNING)",
    Event.WORKER_RETIRED: "a task left something behind; its worker was retired (WARNING)",
    Event.PROTOCOL_FAULT: "a worker broke the pipe protocol; killed (ERROR)",
    Event.SESSION_OPENED: "a parent session said hello (DEBUG)",
    Event.SESSION_CLOSED: "a parent session ended (DEBUG)",
    Event.SUMMARY: "the periodic summary of task outcomes (INFO)",
    Event.READY: "the broker serves (INFO)",
    Event.STOPPING: "the broker stops (INFO)",
    Event.RELOADED: "server.ini and the codeunit modules were reloaded (INFO)",
    Event.RELOAD_FAILED: "a reload was refused; the running code stays (ERROR)",
    Event.TAKEN: (
        "a task's worker was found to have taken it off its pipe, when the broker had to know:"
        " at its deadline, at AckTimeout, or when the worker ended (DEBUG)"
    ),
}


def task_fields(task: Task, event: Event, **fields: Any) -> dict[str, Any]:
    return {
        "event": event.value,
        "session": task.session.id,
        "page": task.page.id,
        "task": task.id,
        "codeunit": task.codeunit,
        **fields,
    }


def task_event(
    log: logging.Logger,
    level: int,
    event: Event,
    task: Task,
    text: str,
    *args: object,
    **fields: Any,
) -> None:
    """Log ``text % args`` about ``task`` with its event fields; nothing is built when the
    level is not emitted (a line per task would otherwise cost throughput)."""
    if log.isEnabledFor(level):
        log.log(level, text, *args, extra={"pbt": task_fields(task, event, **fields)})


def event(
    log: logging.Logger, level: int, event: Event, text: str, *args: object, **fields: Any
) -> None:
    """Log an event that concerns no single task."""
    if log.isEnabledFor(level):
        log.log(level, text, *args, extra={"pbt": {"event": event.value, **fields}})


def render_markdown() -> str:
    rows = ["| event | meaning |", "|---|---|"]
    rows += [f"| `{e.value}` | {e.meaning} |" for e in Event]
    return "\n".join(rows) + "\n"
