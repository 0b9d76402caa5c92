"""``ctx.set_progress``: the latest value reaches the page, at most once per interval, never
after the outcome; a shared execution's progress reaches every attached page; both clients
show it (``page.on_progress``, ``task.progress``, ``task.progress_updates()``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

import pytest

from pbt_server.client import BackgroundTaskCanceled, BackgroundTaskError
from pbt_server.client import aio as aio_client
from pbt_server.protocol import FrameDecoder, encode_frame
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


# --- what the clients show ------------------------------------------------------------


def test_on_progress_runs_in_order_and_before_the_completion_trigger(start_broker):
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.020"}})
    calls: list[tuple[str, int, dict[str, str]]] = []
    with broker.connect() as session:
        page = session.open_page("Import")
        page.on_progress = lambda task_id, progress: calls.append(("progress", task_id, progress))
        page.on_completed = lambda task_id, results: calls.append(("completed", task_id, results))
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "30", "pause": "0.01"})
        wait_until(lambda: any(kind == "completed" for kind, _, _ in calls))
        assert task.progress is not None
        assert task.progress["of"] == "30"
    kinds = [kind for kind, _, _ in calls]
    assert kinds[-1] == "completed"
    assert kinds.count("completed") == 1
    assert "progress" in kinds
    assert {task_id for _, task_id, _ in calls} == {task.id}
    done = [int(value["done"]) for kind, _, value in calls if kind == "progress"]
    assert done == sorted(done)
    assert len(done) == len(set(done))  # each value once


def test_the_blocking_progress_iterator_ends_with_the_outcome(start_broker):
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.020"}})
    with broker.connect() as session:
        page = session.open_page("Import")
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "20", "pause": "0.01"})
        seen = [int(p["done"]) for p in task.progress_updates(timeout=30)]
        assert task.done()
        assert task.result(timeout=0) == {"steps": "20"}
    assert seen
    assert seen == sorted(seen)
    assert seen[-1] <= 20


def test_the_blocking_progress_iterator_times_out(start_broker):
    broker = start_broker()
    with broker.connect() as session:
        page = session.open_page("Import")
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "400", "pause": "0.01"})
        updates = task.progress_updates(timeout=0.5)
        with pytest.raises(TimeoutError, match=f"task {task.id} has no outcome after 0.5 s"):
            for _ in updates:
                pass
        assert task.cancel()


def test_a_page_that_moved_on_gets_no_more_progress(start_broker):
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.020"}})
    with broker.connect() as session:
        page = session.open_page("Customer Card", "Customer: 10000")
        calls: list[tuple[int, bool]] = []  # (task id, whether the page had moved on)
        moved = threading.Event()
        page.on_progress = lambda task_id, progress: calls.append((task_id, moved.is_set()))
        task = page.enqueue_background_task(cu.PROGRESS, {"steps": "300", "pause": "0.01"})
        wait_until(lambda: len(calls) >= 2)
        page.set_record("Customer: 20000")
        moved.set()
        with pytest.raises(BackgroundTaskCanceled):
            task.result(timeout=20)
        assert list(task.progress_updates(timeout=1)) == []
        # Everything due after the move has been dispatched once a later task's trigger ran.
        done = threading.Event()
        page.on_completed = lambda task_id, results: done.set()
        later = page.enqueue_background_task(cu.PROGRESS, {"steps": "1", "pause": "0"})
        assert done.wait(20)
    assert (task.id, True) not in calls
    assert {task_id for task_id, _ in calls} <= {task.id, later.id}


def test_asyncio_progress_updates_and_on_progress(start_broker):
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.020"}})

    async def main() -> tuple[list[int], list[int], dict[str, str]]:
        async with await aio_client.connect(str(broker.socket)) as session:
            page = await session.open_page("Import")
            triggered: list[int] = []

            async def on_progress(task_id: int, progress: dict[str, str]) -> None:
                triggered.append(int(progress["done"]))

            page.on_progress = on_progress
            task = await page.enqueue_background_task(cu.PROGRESS, {"steps": "25", "pause": "0.01"})
            iterated = []
            async with asyncio.timeout(30):
                async for progress in task.progress_updates():
                    iterated.append(int(progress["done"]))
            return iterated, triggered, await task.result(timeout=5)

    iterated, triggered, results = asyncio.run(main())
    assert results == {"steps": "25"}
    assert iterated
    assert iterated == sorted(iterated)
    assert triggered
    assert triggered == sorted(triggered)


def test_a_client_that_stops_reading_gets_no_progress_backlog(start_broker):
    """Progress for a session that does not read waits (one value per task), it is not
    queued: the client that finally reads finds few progress frames, and the outcomes."""
    broker = start_broker({"AsynchronousProcessing": {"ProgressInterval": "00:00:00.010"}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    decoder = FrameDecoder(1 << 24, trusted=True)
    frames: list[dict[str, Any]] = []

    def until(rid: int) -> None:
        while not any(f.get("rid") == rid for f in frames):
            data = sock.recv(65536)
            assert data, f"the broker closed the connection: {frames}"
            frames.extend(decoder.feed(data))

    try:
        sock.connect(str(broker.socket))
        sock.sendall(encode_frame({"op": "hello", "rid": 1, "protocol": 1, "token": ""}))
        sock.sendall(encode_frame({"op": "open_page", "rid": 2, "name": "Import", "record": ""}))
        until(2)
        page = next(f for f in frames if f.get("rid") == 2)["page"]
        params = {"steps": "300", "pause": "0.005"}  # 1.5 s or more of progress each
        for rid in (3, 4):
            task = {"page": page, "codeunit": cu.PROGRESS, "parameters": params, "timeout": None}
            sock.sendall(encode_frame({"op": "enqueue", "rid": rid, **task, "level": "Error"}))
        until(4)
        # Status replies (~1 KiB each) nobody reads: the broker's buffer for this client is
        # past the progress backlog limit while both tasks run.
        sock.sendall(b"".join(encode_frame({"op": "status", "rid": 10 + i}) for i in range(1500)))
        wait_until(lambda: _idle(broker), timeout=60)
        with contextlib.suppress(TimeoutError):
            sock.settimeout(2)
            while len([f for f in frames if f["op"] in ("completed", "failed")]) < 2:
                data = sock.recv(65536)
                if not data:
                    break
                frames.extend(decoder.feed(data))
    finally:
        sock.close()
    outcomes = [f["op"] for f in frames if f["op"] in ("completed", "failed", "cancelled")]
    assert outcomes == ["completed", "completed"]
    progress = [f for f in frames if f["op"] == "progress"]
    # Not reading for 1.5 s at 10 ms per update per task would have queued ~300.
    assert len(progress) < 60, len(progress)


def _idle(broker: Any) -> bool:
    totals = broker.status()["totals"]
    return totals["running"] == 0 and totals["waiting"] == 0
