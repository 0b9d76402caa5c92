"""Per-session concurrency and queue limits, and fairness across sessions."""

from __future__ import annotations

import pytest

from pbt_server.client import BackgroundTaskCanceled, QueueFull
from tests import codeunits as cu
from tests.support import wait_until


def test_concurrency_and_queue_limits(start_broker):
    broker = start_broker(
        {
            "Workers": {"Count": "4"},
            "AsynchronousProcessing": {
                "ChildSessionsMaxConcurrency": "2",
                "ChildSessionsMaxQueueLength": "3",
            },
        }
    )
    with broker.connect() as session:
        page = session.open_page("P")
        tasks = [page.enqueue_background_task(cu.SLEEP, {"seconds": "30"}) for _ in range(5)]

        def counts():
            (mine,) = [s for s in broker.status()["sessions"] if s["id"] == session.id]
            return (mine["running"], mine["waiting"])

        wait_until(lambda: counts() == (2, 3))  # 4 workers, but 2 per session
        with pytest.raises(QueueFull) as caught:
            page.enqueue_background_task(cu.NOOP)
        assert caught.value.code == "ChildSessionQueueFull"
        # another session has its own limits
        with broker.connect() as other:
            assert other.open_page("Q").enqueue_background_task(cu.NOOP).result(timeout=10) == {}
        for task in tasks:
            task.cancel()
            with pytest.raises(BackgroundTaskCanceled):
                task.result(timeout=5)


def test_a_busy_session_does_not_starve_a_quiet_one(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as busy, broker.connect() as quiet:
        busy_page = busy.open_page("Busy")
        flood = [busy_page.enqueue_background_task(cu.SLEEP, {"seconds": "0.2"}) for _ in range(20)]
        wait_until(lambda: broker.status()["workers"][0]["task"] is not None)
        single = quiet.open_page("Quiet").enqueue_background_task(cu.NOOP)
        assert single.result(timeout=10) == {}
        # the quiet task ran right after the busy task that was running, not after the flood
        assert sum(task.done() for task in flood) <= 2
        for task in flood:
            task.cancel()
