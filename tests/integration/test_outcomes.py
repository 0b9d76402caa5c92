"""Task outcomes through the real client, broker and worker processes (SPEC §3)."""

from __future__ import annotations

import threading

import pytest

from pbt_server.client import (
    BackgroundTaskError,
    ErrorLevel,
    InvalidParameters,
    Notification,
    PageClosed,
    UnknownCodeunit,
)
from tests import codeunits as cu
from tests.support import recorder, wait_until


def test_completion_trigger_receives_the_results(broker):
    calls: list[tuple[int, dict[str, str]]] = []
    with broker.connect() as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")
        page.on_completed = lambda task_id, results: calls.append((task_id, results))
        task = page.enqueue_background_task(cu.ECHO, {"Wait": "1000", "ü": "ß"})
        assert task.id == 1
        assert task.result(timeout=10) == {"Wait": "1000", "ü": "ß"}
        assert task.done()
        wait_until(lambda: calls)
        assert calls == [(1, {"Wait": "1000", "ü": "ß"})]


def test_codeunit_returning_none_completes_with_an_empty_dict(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.NONE_RESULT).result(timeout=10) == {}


def test_child_session_context(broker):
    with broker.connect() as session:
        page = session.open_page("P", record_id="Customer: 42")
        page.enqueue_background_task(cu.NOOP).result(timeout=10)
        results = page.enqueue_background_task(cu.CONTEXT, timeout=5000).result(timeout=10)
        assert results["task_id"] == "2"
        assert results["session_id"] == str(session.id)
        assert results["record_id"] == "Customer: 42"
        assert results["codeunit_id"] == str(cu.CONTEXT)
        assert 0 < int(results["remaining_ms"]) <= 5000
        assert int(results["pid"]) in broker.worker_pids()


def test_error_trigger_gets_code_text_and_call_stack(broker):
    errors: list[tuple[int, str, str, str]] = []
    with broker.connect() as session:
        page = session.open_page("P")
        page.on_error = recorder(errors, handled=True)
        task = page.enqueue_background_task(cu.RAISE, {"message": "no such customer"})
        with pytest.raises(BackgroundTaskError) as caught:
            task.result(timeout=10)
        assert caught.value.code == "ValueError"
        assert caught.value.text == "no such customer"
        assert "raise_value_error" in caught.value.call_stack
        wait_until(lambda: errors)
        task_id, code, text, stack = errors[0]
        assert (task_id, code, text) == (task.id, "ValueError", "no such customer")
        assert "Traceback" in stack


@pytest.mark.parametrize(
    ("codeunit", "parameters", "code", "text"),
    [
        (cu.CUSTOM_ERROR, {}, "CUST:Blocked", "Customer is blocked"),
        (cu.DB_WRITE, {}, "DB:WriteDenied", "readonly database"),
        (cu.BAD_RESULT, {}, "ChildSessionInvalidResult", "int is not str"),
        (cu.BIG_RESULT, {"bytes": "2000000"}, "ChildSessionInvalidResult", "the limit is"),
        (cu.EXIT, {"code": "7"}, "ChildSessionCrashed", "exited with code 7"),
        (cu.SIGNAL_SELF, {"signal": "SIGSEGV"}, "ChildSessionCrashed", "killed by SIGSEGV"),
    ],
)
def test_error_codes(broker, codeunit, parameters, code, text):
    with broker.connect() as session:
        page = session.open_page("P")
        with pytest.raises(BackgroundTaskError) as caught:
            page.enqueue_background_task(codeunit, parameters).result(timeout=20)
        assert caught.value.code == code
        assert text in caught.value.text


def test_a_crash_fails_only_its_own_task_and_the_worker_is_replaced(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        sleeper = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"})
        crasher = page.enqueue_background_task(cu.EXIT, {"code": "3"})
        with pytest.raises(BackgroundTaskError, match="exited with code 3"):
            crasher.result(timeout=10)
        assert sleeper.result(timeout=10)["slept"] == "0.5"
        wait_until(lambda: all(w["state"] == "idle" for w in broker.status()["workers"]))
        assert page.enqueue_background_task(cu.NOOP).result(timeout=10) == {}


def test_reading_the_database(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.DB_READ).result(timeout=10) == {"blocked": "10"}


@pytest.mark.parametrize("level", [ErrorLevel.WARNING, ErrorLevel.ERROR])
def test_unhandled_errors_become_notifications_of_their_level(broker, level):
    notes: list[Notification] = []
    with broker.connect() as session:
        session.on_notification = notes.append
        page = session.open_page("Customer Card")
        page.on_error = lambda *args: False  # not handled
        task = page.enqueue_background_task(cu.RAISE, {"message": "oops"}, error_level=level)
        with pytest.raises(BackgroundTaskError):
            task.result(timeout=10)
        wait_until(lambda: notes)
        assert notes[0].severity is level
        assert (notes[0].task_id, notes[0].code, notes[0].text) == (task.id, "ValueError", "oops")


def test_handled_or_ignored_errors_notify_nobody(broker):
    notes: list[Notification] = []
    with broker.connect() as session:
        session.on_notification = notes.append
        handled = session.open_page("Handled")
        handled.on_error = lambda *args: True
        ignored = session.open_page("Ignored")
        tasks = [
            handled.enqueue_background_task(cu.RAISE, error_level=ErrorLevel.ERROR),
            ignored.enqueue_background_task(cu.RAISE, error_level=ErrorLevel.IGNORE),
        ]
        # a last, unhandled one proves the dispatcher got past the first two
        last = session.open_page("Last")
        last.on_error = recorder([], handled=False)
        tasks.append(last.enqueue_background_task(cu.RAISE, error_level=ErrorLevel.WARNING))
        for task in tasks:
            with pytest.raises(BackgroundTaskError):
                task.result(timeout=10)
        wait_until(lambda: notes)
        assert [n.page_name for n in notes] == ["Last"]


def test_an_exception_in_a_trigger_is_an_error_notification(broker):
    notes: list[Notification] = []
    with broker.connect() as session:
        session.on_notification = notes.append
        page = session.open_page("P")

        def broken_trigger(task_id: int, results: dict[str, str]) -> None:
            raise KeyError("Amount")

        page.on_completed = broken_trigger
        page.enqueue_background_task(cu.NOOP).result(timeout=10)
        wait_until(lambda: notes)
        assert notes[0].severity is ErrorLevel.ERROR
        assert notes[0].code == "KeyError"


def test_triggers_run_one_at_a_time_in_completion_order(broker):
    order: list[int] = []
    running = threading.Lock()
    overlaps: list[int] = []
    with broker.connect() as session:
        page = session.open_page("P")

        def trigger(task_id: int, results: dict[str, str]) -> None:
            if not running.acquire(blocking=False):
                overlaps.append(task_id)
                return
            try:
                order.append(task_id)
            finally:
                running.release()

        page.on_completed = trigger
        # two workers: 1 sleeps long; 2 ends first, then 3 runs on its worker; 1 ends last
        tasks = [
            page.enqueue_background_task(cu.SLEEP, {"seconds": s}) for s in ("1.5", "0.3", "0.0")
        ]
        for task in tasks:
            task.result(timeout=10)
        wait_until(lambda: len(order) == 3)
        assert order == [2, 3, 1]
        assert overlaps == []


def test_enqueue_failures_are_raised_synchronously(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        with pytest.raises(UnknownCodeunit) as unknown:
            page.enqueue_background_task(999_999)
        assert unknown.value.code == "UnknownCodeunit"
        with pytest.raises(InvalidParameters) as bad:
            page.enqueue_background_task(cu.ECHO, {"n": 1})
        assert bad.value.code == "InvalidParameters"
        page.close()
        with pytest.raises(PageClosed) as closed:
            page.enqueue_background_task(cu.NOOP)
        assert closed.value.code == "PageClosed"
        # the session is still healthy
        assert session.open_page("Q").enqueue_background_task(cu.NOOP).result(timeout=10) == {}


def test_worker_log_records_reach_the_server_log(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        page.enqueue_background_task(cu.LOG, {"text": "hello-from-the-child-session"}).result(
            timeout=10
        )
    wait_until(lambda: "codeunit says hello-from-the-child-session" in broker.log_text())
