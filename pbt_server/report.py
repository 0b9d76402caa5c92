"""What the broker says about itself: the ``status`` report and the tally of task outcomes."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pbt_server import __version__
from pbt_server.sessions import Session, TaskState

if TYPE_CHECKING:
    from pbt_server.pool import Worker, WorkerPool


def status_report(
    *,
    sessions: Iterable[Session],
    pool: WorkerPool,
    uptime: float,
    socket_path: str,
    tcp: str | None,
) -> dict[str, object]:
    """The answer to a ``status`` request (see the protocol docstring)."""
    workers = [_worker_status(slot, worker) for slot, worker in enumerate(pool.slots)]
    if pool.standby is not None:
        workers.append(_worker_status("standby", pool.standby))
    return {
        "server": {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(uptime, 3),
            "socket": socket_path,
            "tcp": tcp,
        },
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


def _worker_status(slot: int | str, worker: Worker | None) -> dict[str, object]:
    if worker is None:
        return {"slot": slot, "pid": None, "state": "down", "rss": 0, "tasks_done": 0, "task": None}
    task = worker.task
    state = worker.state.value
    if task is not None and task.state is TaskState.STARTING:
        state = "starting"  # handed over, not yet acknowledged: its timeout has not started
    return {
        "slot": slot,
        "pid": worker.pid,
        "state": state,
        "rss": worker.rss() if state != "booting" else 0,
        "tasks_done": worker.tasks_done,
        "task": f"s{task.session.id}/t{task.id}" if task else None,
    }


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
