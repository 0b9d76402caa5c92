"""What the broker says about itself: the ``status`` report, its totals, the health rule, and
the tally of task outcomes.

The status report (``pbt-server status --json``; the README lists every field)::

    {"server":   {"pid", "version", "uptime", "socket", "tcp", "metrics", "max_sessions"},
     "totals":   {"sessions", "pages", "waiting", "running",
                  "workers": {"booting", "idle", "starting", "busy", "down"}, "standby",
                  "worker_ends": {cause: n}, "shared": {"executions", "attaches"},
                  "cache": {"hits", "misses", "entries", "bytes"}},
     "sessions": [{"id", "pages", "waiting", "running", "context"}, ...],
     "workers":  [{"slot", "pid", "state", "rss", "tasks_done", "task", "codeunit",
                   "task_seconds"}, ...]}

Everything here runs on the broker's loop and only reads; :func:`live_state` is the cheap
part of it (no ``/proc`` reads, no session contexts) for the metrics server, which reads
memory in its own thread.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from pbt_server import __version__
from pbt_server.sessions import Session

if TYPE_CHECKING:
    from pbt_server.pool import Worker, WorkerPool

SLOT_STATES: Final = ("booting", "idle", "starting", "busy", "down")
"""The states a worker slot can be in (``totals.workers`` has each, zeros included)."""


def status_report(
    *,
    sessions: Collection[Session],
    pool: WorkerPool,
    now: float,
    uptime: float,
    socket_path: str,
    tcp: str | None,
    metrics: str | None = None,
    max_sessions: int = 0,
    sharing: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The answer to a ``status`` request; ``now`` is the loop's clock (for task ages);
    ``sharing``: the ``shared`` and ``cache`` totals."""
    workers = worker_rows(pool, now, rss=True)
    return {
        "server": {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(uptime, 3),
            "socket": socket_path,
            "tcp": tcp,
            "metrics": metrics,
            "max_sessions": max_sessions,
        },
        "totals": totals(sessions, workers)
        | {"worker_ends": dict(pool.ended)}
        | dict(sharing or {}),
        "sessions": [
            {
                "id": s.id,
                "pages": len(s.pages),
                "waiting": s.waiting,
                "running": s.running,
                "context": dict(s.context),
            }
            for s in sessions
        ],
        "workers": workers,
    }


def live_state(
    sessions: Collection[Session], pool: WorkerPool, now: float, *, busiest: int
) -> dict[str, Any]:
    """Totals, worker rows (``rss`` 0: the caller reads it off the loop) and the ``busiest``
    sessions by waiting + running tasks (no contexts: they may name users)."""
    workers = worker_rows(pool, now, rss=False)
    rows = heapq.nlargest(busiest, sessions, key=lambda s: (s.waiting + s.running, -s.id))
    return {
        "totals": totals(sessions, workers) | {"worker_ends": dict(pool.ended)},
        "sessions": [
            {"id": s.id, "pages": len(s.pages), "waiting": s.waiting, "running": s.running}
            for s in rows
        ],
        "workers": workers,
    }


def totals(sessions: Iterable[Session], workers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums over the sessions, and the worker slots counted by state (the standby apart)."""
    count = pages = waiting = running = 0
    for s in sessions:
        count += 1
        pages += len(s.pages)
        waiting += s.waiting
        running += s.running
    states = dict.fromkeys(SLOT_STATES, 0)
    standby = "down"
    for w in workers:
        if w["slot"] == "standby":
            standby = w["state"]
        else:
            states[w["state"]] += 1
    return {
        "sessions": count,
        "pages": pages,
        "waiting": waiting,
        "running": running,
        "workers": states,
        "standby": standby,
    }


def worker_rows(pool: WorkerPool, now: float, *, rss: bool) -> list[dict[str, Any]]:
    """One row per worker slot, then the standby's while there is one."""
    rows = [_worker_row(pool, slot, worker, now, rss) for slot, worker in enumerate(pool.slots)]
    if pool.standby is not None:
        rows.append(_worker_row(pool, "standby", pool.standby, now, rss))
    return rows


def _worker_row(
    pool: WorkerPool, slot: int | str, worker: Worker | None, now: float, rss: bool
) -> dict[str, Any]:
    if worker is None:
        return {
            "slot": slot,
            "pid": None,
            "state": "down",
            "rss": 0,
            "tasks_done": 0,
            "task": None,
            "codeunit": None,
            "task_seconds": None,
        }
    task = worker.task
    # A timed-out task's worker dumping its stack is still busy with it, for a few ms.
    state = "busy" if worker.state.value == "dumping" else worker.state.value
    if task is not None and worker.state.value == "busy" and not pool.taken(task):
        state = "starting"  # handed over, still in the worker's pipe
    started = task.started_at if task is not None else None
    return {
        "slot": slot,
        "pid": worker.pid,
        "state": state,
        "rss": worker.rss() if rss and state != "booting" else 0,
        "tasks_done": worker.tasks_done,
        "task": f"s{task.session.id}/t{task.id}" if task else None,
        "codeunit": task.codeunit if task else None,
        "task_seconds": round(now - started, 3) if started is not None else None,
    }


def health_problem(report: Mapping[str, Any]) -> str | None:
    """Why a status report is not healthy, or None: every worker slot must hold a worker."""
    down = [w["slot"] for w in report.get("workers", []) if w["slot"] != "standby" and not w["pid"]]
    if down:
        return f"worker slot(s) {down} have no worker (a worker cannot boot?)"
    return None


class Tally:
    """Counts of task outcomes, by kind and code, between two summaries."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, kind: str, code: str) -> None:
        self.counts[kind, code] += 1

    def take(self) -> str:
        """``"120 completed, 3 failed (ValueError 2, ChildSessionTaskTimeout 1)"``; resets."""
        parts = []
        for kind in ("completed", "failed", "cancelled"):
            codes = {code: n for (k, code), n in self.counts.items() if k == kind}
            total = sum(codes.values())
            if total:
                detail = ", ".join(f"{c} {n}" for c, n in sorted(codes.items()) if c)
                parts.append(f"{total} {kind}" + (f" ({detail})" if detail else ""))
        self.counts.clear()
        return ", ".join(parts)
