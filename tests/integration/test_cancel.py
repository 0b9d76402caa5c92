"""Cancellation: no trigger, result discarded, slot freed at once, running worker replaced."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pbt_server.client import BackgroundTaskCanceled
from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import recorder, wait_until


@pytest.fixture(scope="module")
def broker(request):
    """One worker per session slot: MaxConcurrency 1 makes 'slot freed' observable."""
    from tests.broker_process import BrokerProcess

    process = BrokerProcess.start(
        {"AsynchronousProcessing": {"ChildSessionsMaxConcurrency": "1"}, "Workers": {"Count": "2"}}
    )
    try:
        yield process
        assert process.stop() == 0, process.log_text()
    finally:
        process.cleanup()


def _no_triggers(page, fired: list[tuple[Any, ...]]) -> None:
    page.on_completed = lambda *args: fired.append(("completed", *args))
    page.on_error = recorder(fired, handled=True, tag="error")


def test_cancel_a_running_task_frees_the_slot_and_replaces_the_worker(broker):
    fired: list[tuple[Any, ...]] = []
    with broker.connect() as session:
        page = session.open_page("P")
        _no_triggers(page, fired)
        running = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        waiting = page.enqueue_background_task(cu.CONTEXT)  # waits: concurrency 1
        wait_until(
            lambda: any(w["task"] == f"s{session.id}/t1" for w in broker.status()["workers"])
        )
        sleeper = next(w["pid"] for w in broker.status()["workers"] if w["task"])
        assert page.cancel_background_task(running.id) is True
        with pytest.raises(BackgroundTaskCanceled) as caught:
            running.result(timeout=1)
        assert caught.value.code == "Canceled"
        # the slot is free at once: the waiting task runs without waiting 30 s
        assert waiting.result(timeout=10)["task_id"] == "2"
        broker.wait_workers_replaced(sleeper)
        assert page.cancel_background_task(running.id) is False  # already cancelled
        assert page.cancel_background_task(waiting.id) is False  # finished
        assert page.cancel_background_task(12345) is False  # unknown
    assert [f for f in fired if f[1] == running.id] == []


def test_cancel_a_waiting_task(broker):
    fired: list[tuple[Any, ...]] = []
    with broker.connect() as session:
        page = session.open_page("P")
        _no_triggers(page, fired)
        blocker = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"})
        waiting = page.enqueue_background_task(cu.NOOP)
        assert waiting.cancel() is True
        with pytest.raises(BackgroundTaskCanceled):
            waiting.result(timeout=1)
        assert blocker.result(timeout=10)["slept"] == "0.5"
        wait_until(lambda: fired)
        assert [f[:2] for f in fired] == [("completed", blocker.id)]


def test_record_change_cancels_old_tasks_without_trigger(broker):
    fired: list[tuple[Any, ...]] = []
    with broker.connect() as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")
        _no_triggers(page, fired)
        old = [page.enqueue_background_task(cu.SLEEP, {"seconds": "30"}) for _ in range(2)]
        page.set_record("Customer: 20000")
        for task in old:
            with pytest.raises(BackgroundTaskCanceled) as caught:
                task.result(timeout=5)
            assert caught.value.code == "RecordChanged"
        new = page.enqueue_background_task(cu.CONTEXT)
        assert new.result(timeout=10)["record_id"] == "Customer: 20000"
        wait_until(lambda: fired)
        assert [f[:2] for f in fired] == [("completed", new.id)]


def test_page_close_cancels_its_tasks_only(broker):
    fired: list[tuple[Any, ...]] = []
    with broker.connect() as session:
        closing = session.open_page("Closing")
        staying = session.open_page("Staying")
        _no_triggers(closing, fired)
        doomed = closing.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        kept = staying.enqueue_background_task(cu.NOOP)
        closing.close()
        with pytest.raises(BackgroundTaskCanceled) as caught:
            doomed.result(timeout=5)
        assert caught.value.code == "PageClosed"
        assert kept.result(timeout=10) == {}
    assert fired == []


def test_disconnect_cancels_the_sessions_tasks_and_frees_workers(broker):
    session = broker.connect()
    page = session.open_page("P")
    page.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
    wait_until(lambda: any(w["task"] for w in broker.status()["workers"]))
    sleeper = next(w["pid"] for w in broker.status()["workers"] if w["task"])
    session.close()
    broker.wait_workers_replaced(sleeper)
    status = broker.status()
    assert all(w["task"] is None for w in status["workers"])
    assert [s for s in status["sessions"] if s["running"] or s["waiting"]] == []


def test_a_cancel_racing_completion_ends_the_task_exactly_once(broker):
    outcomes: list[str] = []
    lock = threading.Lock()
    with broker.connect() as session:
        page = session.open_page("P")

        def record(kind: str):
            def trigger(*args: object) -> bool:
                with lock:
                    outcomes.append(kind)
                return True

            return trigger

        page.on_completed = record("completed")
        page.on_error = record("error")
        tasks = [page.enqueue_background_task(cu.NOOP) for _ in range(40)]
        cancelled = sum(task.cancel() for task in tasks[::2])
        results = 0
        for task in tasks:
            try:
                task.result(timeout=10)
                results += 1
            except BackgroundTaskCanceled:
                pass
        assert results + cancelled == 40
        wait_until(lambda: len(outcomes) == results)
        assert outcomes == ["completed"] * results


def test_a_cancelled_task_that_ends_within_the_grace_keeps_its_worker(start_broker):
    """CancelGrace: a short task cancelled mid-run finishes aside, its answer dropped, and
    its worker lives on as the standby: no kill, no fork."""
    broker = start_broker({"Workers": {"Count": "1", "CancelGrace": "00:00:02"}})
    with broker.connect() as session:
        page = session.open_page("P", "R1")
        fired: list[tuple[Any, ...]] = []
        _no_triggers(page, fired)
        task = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        worker = next(w["pid"] for w in broker.status()["workers"] if w["task"])
        page.set_record("R2")  # the page moves on
        with pytest.raises(BackgroundTaskCanceled):
            task.result(timeout=1)
        # the slot has a worker at once, and a new task runs while the old one finishes
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=10) == {"a": "b"}

        def reused() -> bool:
            rows = broker.status()["workers"]
            return any(w["slot"] == "standby" and w["pid"] == worker for w in rows)

        wait_until(reused, timeout=10)
        assert broker.status()["totals"]["worker_ends"].get("cancel", 0) == 0
    assert [f for f in fired if f[1] == task.id] == []  # no trigger for the cancelled one


def test_a_cancelled_task_that_runs_past_the_grace_is_killed(start_broker):
    broker = start_broker({"Workers": {"Count": "1", "CancelGrace": "00:00:00.050"}})
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.SPIN)
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        spinner = next(w["pid"] for w in broker.status()["workers"] if w["task"])
        assert task.cancel()
        wait_until(lambda: not alive(spinner), timeout=10)
        wait_until(lambda: broker.status()["totals"]["worker_ends"].get("cancel") == 1)
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=10) == {"a": "b"}
