"""``ctx.set_progress``: the latest value reaches the page, at most once per interval, never
after the outcome; a shared execution's progress reaches every attached page."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.support import wait_until


class Events:
    """Every event a session's connection receives, in order (the client's tap)."""

    def __init__(self, session: Any) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        session._core.tap = self._record

    def _record(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.seen.append(dict(message))

    def of(self, task_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.seen if m.get("task") == task_id]


def test_progress_reaches_the_page_rate_limited_and_never_after_the_outcome(start_broker):
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.050"}})
    with broker.connect() as session:
        events = Events(session)
        page = session.open_page("Import")
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "40", "pause": "0.01"})
        assert task.result(timeout=20) == {"steps": "40"}
        seen = events.of(task.id)
    ops = [m["op"] for m in seen]
    assert ops[-1] == "completed"
    progress = [m["progress"] for m in seen if m["op"] == "progress"]
    assert progress, ops
    assert "progress" not in ops[ops.index("completed") :]
    # 40 steps of 10 ms or more, relayed at most once per 50 ms: far fewer than 40.
    assert len(progress) < 20, len(progress)
    done = [int(p["done"]) for p in progress]
    assert done == sorted(done)
    assert all(p["of"] == "40" for p in progress)


def test_a_shared_executions_progress_reaches_every_attached_page(start_broker, tmp_path):
    broker = start_broker()
    go = tmp_path / "go"
    params = {"steps": "5", "pause": "0.05", "go": str(go)}
    with broker.connect() as a, broker.connect() as b:
        ea, eb = Events(a), Events(b)
        ta = a.open_page("Cue").enqueue_background_task(cu.SHARED_PROGRESS, params)
        tb = b.open_page("Cue").enqueue_background_task(cu.SHARED_PROGRESS, params)
        go.touch()
        assert ta.result(timeout=20) == tb.result(timeout=20)
        for events, task in ((ea, ta), (eb, tb)):
            ops = [m["op"] for m in events.of(task.id)]
            assert "progress" in ops
            assert ops[-1] == "completed"


def test_a_cancelled_task_gets_no_more_progress(start_broker):
    broker = start_broker()
    with broker.connect() as session:
        events = Events(session)
        page = session.open_page("Import")
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "200", "pause": "0.01"})
        wait_until(lambda: any(m["op"] == "progress" for m in events.of(task.id)))
        assert task.cancel()
        wait_until(lambda: [m["op"] for m in events.of(task.id)][-1] == "cancelled")
        # Longer than an interval later, nothing more came for it.
        later = page.enqueue_background_task(cu.PROGRESS, {"steps": "1", "pause": "0.2"})
        later.result(timeout=20)
        assert [m["op"] for m in events.of(task.id)][-1] == "cancelled"


def test_progress_over_4_kb_fails_the_codeunit(start_broker):
    broker = start_broker()
    with broker.connect() as session:
        page = session.open_page("Import")
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "1", "bad": "1"})
        with pytest.raises(BackgroundTaskError) as failed:
            task.result(timeout=20)
        assert failed.value.code == "ValueError"
        assert "at most 4096" in failed.value.text
