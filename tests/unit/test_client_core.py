"""The client's sans-IO core: feed it broker frames, check what it resolved and dispatched."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pbt_server.client._core import (
    DEFAULT_SOCKET,
    Core,
    ErrorLevel,
    Notification,
    PageState,
    PendingRequest,
    TaskState,
    check_text,
    resolve_address,
    run_dispatch,
    status_fields,
)
from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ClientClosed,
    ConnectionLost,
    InvalidParameters,
    PageClosed,
    PbtError,
    ProtocolError,
    QueueFull,
    UnknownCodeunit,
)
from pbt_server.protocol import MAX_TEXT, Enqueue, FrameDecoder, Message, parse_request

CODEUNIT = 50100


class Flag:
    """A Signal that counts how often it was set."""

    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1


def decode(frame: bytes) -> Message:
    (message,) = FrameDecoder().feed(frame)
    return message


def new_core() -> Core:
    core = Core(max_frame=1 << 20)
    core.welcome({"op": "reply", "rid": 1, "session": 7})
    return core


def new_page(core: Core, page_id: int = 3, record: str = "Customer: 10000") -> PageState:
    page = PageState(page_id, "Customer Card", record)
    core.add_page(page)
    return page


def enqueue(
    core: Core,
    page: PageState,
    task_id: int,
    level: ErrorLevel | str = ErrorLevel.ERROR,
) -> TaskState[PageState]:
    task = TaskState(page, Flag())
    fields = core.enqueue(page, task, CODEUNIT, {"Wait": "1"}, None, level)
    pending, _ = core.request("enqueue", fields, Flag(), task)
    core.receive({"op": "reply", "rid": pending.rid, "task": task_id, "timeout": 120_000})
    assert task.id == task_id
    return task


def signal_count(task: TaskState[Any]) -> int:
    signal = task._signal
    assert isinstance(signal, Flag)
    return signal.count


def never(*args: object) -> None:
    pytest.fail("no trigger may run")


def completed(task_id: int, **results: str) -> Message:
    return {"op": "completed", "task": task_id, "page": 3, "results": results}


def failed(task_id: int, code: str = "ValueError", text: str = "bad") -> Message:
    return {"op": "failed", "task": task_id, "page": 3, "code": code, "text": text, "stack": "tb"}


def cancelled(task_id: int, code: str = "Canceled") -> Message:
    return {"op": "cancelled", "task": task_id, "page": 3, "code": code, "text": "gone"}


# --- requests and replies -----------------------------------------------------------------


def test_requests_get_increasing_rids_and_valid_frames() -> None:
    core = new_core()
    page = new_page(core)
    task = TaskState(page, Flag())
    fields = core.enqueue(page, task, CODEUNIT, {"A": "1"}, 5000, "Warning")
    first, frame = core.request("enqueue", fields, Flag(), task)
    second, _ = core.request("ping", {}, Flag())
    assert (first.rid, second.rid) == (1, 2)
    request = parse_request(decode(frame))  # what the broker will check
    assert request == Enqueue(
        rid=1, page=3, codeunit=CODEUNIT, parameters={"A": "1"}, timeout=5000, level="Warning"
    )


def test_reply_answers_the_pending_request_once() -> None:
    core = new_core()
    flag = Flag()
    pending, _ = core.request("open_page", {"name": "P", "record": ""}, flag)
    assert core.receive({"op": "reply", "rid": pending.rid, "page": 4}) is None
    assert flag.count == 1
    assert pending.result()["page"] == 4
    core.receive({"op": "reply", "rid": pending.rid, "page": 5})  # unknown rid now: ignored
    assert flag.count == 1
    assert pending.result()["page"] == 4


@pytest.mark.parametrize(
    ("code", "cls"),
    [("ChildSessionQueueFull", QueueFull), ("UnknownCodeunit", UnknownCodeunit)],
)
def test_error_reply_raises_the_registered_error(code: str, cls: type[PbtError]) -> None:
    core = new_core()
    page = new_page(core)
    task = TaskState(page, Flag())
    fields = core.enqueue(page, task, CODEUNIT, None, None, ErrorLevel.ERROR)
    pending, _ = core.request("enqueue", fields, Flag(), task)
    core.receive({"op": "error", "rid": pending.rid, "code": code, "text": "no"})
    with pytest.raises(cls) as caught:
        pending.result()
    assert caught.value.code == code
    assert not task.done()


def test_error_without_rid_means_the_broker_dropped_us() -> None:
    core = new_core()
    with pytest.raises(ConnectionLost, match="ProtocolError: frame too big"):
        core.receive({"op": "error", "rid": None, "code": "ProtocolError", "text": "frame too big"})


def test_malformed_event_is_a_protocol_error() -> None:
    core = new_core()
    with pytest.raises(ProtocolError):
        core.receive({"op": "completed", "task": "1", "page": 3, "results": {}})


def test_unknown_event_is_ignored() -> None:
    assert new_core().receive({"op": "progress", "task": 1}) is None


def test_status_fields_drop_the_envelope() -> None:
    reply: Message = {"op": "reply", "rid": 9, "sessions": [], "workers": []}
    assert status_fields(reply) == {"sessions": [], "workers": []}


# --- outcomes -----------------------------------------------------------------------------


def test_completed_resolves_the_handle_before_dispatch() -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = lambda task_id, results: None
    task = enqueue(core, page, 1)
    assert core.receive(completed(1, Count="3")) is task
    assert task.done()
    assert signal_count(task) == 1
    assert task._outcome() == {"Count": "3"}


def test_completed_without_trigger_is_resolved_and_dropped() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    assert core.receive(completed(1)) is None
    assert task._outcome() == {}


def test_failed_resolves_with_background_task_error() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    assert core.receive(failed(1, "ChildSessionTaskTimeout", "timed out")) is task
    with pytest.raises(BackgroundTaskError) as caught:
        task._outcome()
    error = caught.value
    assert (error.code, error.text, error.call_stack, error.task_id) == (
        "ChildSessionTaskTimeout",
        "timed out",
        "tb",
        1,
    )


def test_cancelled_resolves_with_its_reason_and_no_trigger() -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    page.on_error = never
    task = enqueue(core, page, 1)
    assert core.receive(cancelled(1, "Canceled")) is None
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert (caught.value.code, caught.value.task_id) == ("Canceled", 1)


@pytest.mark.parametrize("second", [completed(1), failed(1), cancelled(1)])
@pytest.mark.parametrize("first", [completed(1, X="1"), failed(1), cancelled(1)])
def test_outcome_is_delivered_exactly_once(first: Message, second: Message) -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = lambda task_id, results: None
    task = enqueue(core, page, 1)
    core.receive(first)
    outcome = (task._results, task._error)
    assert core.receive(second) is None
    assert (task._results, task._error) == outcome
    assert signal_count(task) == 1


def test_outcome_after_record_change_is_a_cancel_without_trigger() -> None:
    core = new_core()
    page = new_page(core, record="Customer: 10000")
    page.on_completed = never
    task = enqueue(core, page, 1)
    fields = core.set_record(page, "Customer: 20000")  # local first, then the request
    assert fields == {"page": 3, "record": "Customer: 20000"}
    assert page.record_id == "Customer: 20000"
    assert core.receive(completed(1)) is None
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == "RecordChanged"


def test_failure_after_page_close_is_a_cancel_without_trigger() -> None:
    core = new_core()
    page = new_page(core)
    task = enqueue(core, page, 1)
    assert core.close_page(page) is True
    assert core.close_page(page) is False  # idempotent: nothing more to send
    assert page.closed
    assert core.receive(failed(1)) is None
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == "PageClosed"


@pytest.mark.parametrize(
    ("op", "code"), [("set_record", "RecordChanged"), ("close_page", "PageClosed")]
)
def test_cancelled_list_in_reply_mops_up_unresolved_tasks(op: str, code: str) -> None:
    core = new_core()
    page = new_page(core)
    task = enqueue(core, page, 1)
    pending, _ = core.request(op, {"page": page.id}, Flag())
    core.receive({"op": "reply", "rid": pending.rid, "cancelled": [1, 99]})
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == code


def test_clean_end_of_stream_says_the_server_closed_it() -> None:
    core = new_core()
    core.connection_lost()
    with pytest.raises(ConnectionLost, match="the server closed the connection"):
        core.check_open()


def test_after_shutdown_event_its_text_is_the_reason() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    core.receive({"op": "shutdown", "code": "ServerShuttingDown", "text": "pbt-server stop"})
    assert not task.done()  # the broker closes the connection next
    core.connection_lost("[Errno 32] Broken pipe")
    with pytest.raises(ConnectionLost, match="the server shut down: pbt-server stop"):
        task._outcome()


def test_malformed_reply_stays_pending_until_the_connection_is_dropped() -> None:
    core = new_core()
    page = new_page(core)
    task = TaskState(page, Flag())
    flag = Flag()
    pending, _ = core.request(
        "enqueue", core.enqueue(page, task, 1, None, None, "Error"), flag, task
    )
    with pytest.raises(ProtocolError):
        core.receive({"op": "reply", "rid": pending.rid, "task": "1"})
    core.connection_lost("bad frame from the server")
    assert flag.count == 1
    with pytest.raises(ConnectionLost):
        pending.result()


# --- the end of a session -----------------------------------------------------------------


def test_connection_lost_fails_every_pending_request_and_handle() -> None:
    core = new_core()
    page = new_page(core)
    tasks = [enqueue(core, page, task_id) for task_id in (1, 2)]
    flag = Flag()
    pending, _ = core.request("ping", {}, flag)
    core.connection_lost("the server shut down: bye")
    assert flag.count == 1
    with pytest.raises(ConnectionLost, match="bye"):
        pending.result()
    for task in tasks:
        assert signal_count(task) == 1
        with pytest.raises(ConnectionLost, match="bye"):
            task._outcome()
    assert page.closed
    assert core.ended
    core.connection_lost("second reason")  # no-op: the first reason stays
    with pytest.raises(ConnectionLost, match="bye"):
        core.request("ping", {}, Flag())
    assert core.should_cancel(page, 1) is False  # cancel never raises for a broken link


def test_close_cancels_handles_and_later_calls_raise_client_closed() -> None:
    core = new_core()
    page = new_page(core)
    task = enqueue(core, page, 1)
    pending, _ = core.request("ping", {}, Flag())
    core.close()
    with pytest.raises(ClientClosed):
        pending.result()
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == "SessionClosed"
    with pytest.raises(ClientClosed):
        core.request("ping", {}, Flag())
    with pytest.raises(ClientClosed):  # the session's state wins over the page's
        core.enqueue(page, TaskState(page, Flag()), CODEUNIT, None, None, "Error")
    with pytest.raises(ClientClosed):
        core.should_cancel(page, 1)
    core.close()  # idempotent


def test_close_after_connection_lost_is_the_users_doing() -> None:
    core = new_core()
    core.connection_lost("reset")
    core.close()
    with pytest.raises(ClientClosed):
        core.check_open()


def test_abandoned_request_ignores_its_late_reply() -> None:
    core = new_core()
    flag = Flag()
    pending, _ = core.request("hello", {"protocol": 1, "token": ""}, flag)
    core.abandon(pending)
    core.receive({"op": "reply", "rid": pending.rid, "session": 1})
    assert flag.count == 0
    core.connection_lost("late")
    assert flag.count == 0  # no longer pending


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codeunit_id": "50100"}, "codeunit_id must be an int, not str"),
        ({"codeunit_id": True}, "codeunit_id must be an int, not bool"),
        ({"codeunit_id": -1}, "out of range"),
        ({"parameters": [("A", "1")]}, "must be a mapping, not list"),
        ({"parameters": {"A": 1}}, "parameter 'A': value is int, not str"),
        ({"parameters": {2: "x"}}, "parameter key 2 is int, not str"),
        ({"parameters": {"Big": "x" * (2 << 20)}}, "over the 1048576-byte frame limit"),
        ({"timeout": 1.5}, "timeout must be None or an int"),
        ({"timeout": True}, "timeout must be None or an int"),
        ({"error_level": "Fatal"}, "error_level must be an ErrorLevel"),
        ({"error_level": 2}, "error_level must be an ErrorLevel"),
    ],
)
def test_enqueue_arguments_are_checked_before_anything_is_sent(
    kwargs: dict[str, Any], match: str
) -> None:
    core = new_core()
    page = new_page(core)
    args: dict[str, Any] = {
        "codeunit_id": CODEUNIT,
        "parameters": None,
        "timeout": None,
        "error_level": ErrorLevel.ERROR,
    }
    args.update(kwargs)
    task = TaskState(page, Flag())

    def submit() -> None:  # the size check needs the encoded frame, so it is in request()
        core.request("enqueue", core.enqueue(page, task, **args), Flag(), task)

    with pytest.raises(InvalidParameters, match=match):
        submit()
    assert core._pending == {}
    pending, _ = core.request("ping", {}, Flag())
    assert pending.rid == 1  # no rid was spent on the refused enqueue


def test_enqueue_copies_parameters_and_accepts_level_strings() -> None:
    core = new_core()
    page = new_page(core)
    parameters = {"Wait": "10"}
    task = TaskState(page, Flag())
    fields = core.enqueue(page, task, CODEUNIT, parameters, -1, "Ignore")
    parameters["Wait"] = "changed"
    assert fields["parameters"] == {"Wait": "10"}
    assert fields["level"] == "Ignore"
    assert task.error_level is ErrorLevel.IGNORE
    assert task.record_id == "Customer: 10000"


def test_enqueue_on_a_closed_page_raises_page_closed() -> None:
    core = new_core()
    page = new_page(core)
    core.close_page(page)
    with pytest.raises(PageClosed):
        core.enqueue(page, TaskState(page, Flag()), CODEUNIT, None, None, "Error")
    with pytest.raises(ClientClosed):
        core.set_record(page, "Customer: 1")


@pytest.mark.parametrize(
    ("value", "error"), [(None, TypeError), (b"x", TypeError), ("x" * (MAX_TEXT + 1), ValueError)]
)
def test_names_and_record_ids_are_checked(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="record_id"):
        check_text("record_id", value)
    core = new_core()
    with pytest.raises(error):
        core.set_record(new_page(core), value)


def test_should_cancel_only_this_pages_unresolved_tasks() -> None:
    core = new_core()
    page, other = new_page(core, 3), new_page(core, 4)
    enqueue(core, page, 1)
    assert core.should_cancel(page, 1) is True
    assert core.should_cancel(other, 1) is False
    assert core.should_cancel(page, 2) is False
    assert core.should_cancel(page, True) is False
    assert core.should_cancel(page, "1") is False
    core.receive(completed(1))
    assert core.should_cancel(page, 1) is False


def test_resolve_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PBT_SOCKET", raising=False)
    assert resolve_address(None) == DEFAULT_SOCKET
    monkeypatch.setenv("PBT_SOCKET", "/run/pbt.sock")
    assert resolve_address(None) == "/run/pbt.sock"
    assert resolve_address(tmp_path / "s.sock") == str(tmp_path / "s.sock")
    assert resolve_address(("127.0.0.1", 7085)) == ("127.0.0.1", 7085)
    with pytest.raises(TypeError):
        resolve_address(("127.0.0.1", "7085"))  # type: ignore[arg-type]


# --- dispatch: triggers, error levels, notifications --------------------------------------


def dispatch_failure(
    core: Core,
    level: ErrorLevel,
    on_error: Callable[[int, str, str, str], object] | None,
) -> list[Notification]:
    notes: list[Notification] = []
    core.on_notification = notes.append
    page = new_page(core)
    page.on_error = on_error
    task = enqueue(core, page, 1, level)
    work = core.receive(failed(1, "ChildSessionTaskTimeout", "timed out"))
    assert work is task
    run_dispatch(core.dispatch(work))
    return notes


@pytest.mark.parametrize("level", list(ErrorLevel))
@pytest.mark.parametrize("handled", [None, False, True, 0, "yes"])
def test_error_level_matrix(
    level: ErrorLevel, handled: object, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[int, str, str, str]] = []

    def on_error(task_id: int, code: str, text: str, call_stack: str) -> object:
        calls.append((task_id, code, text, call_stack))
        return handled

    caplog.set_level(logging.DEBUG, logger="pbt_server.client")
    notes = dispatch_failure(new_core(), level, on_error if handled is not None else None)
    if handled is not None:
        assert calls == [(1, "ChildSessionTaskTimeout", "timed out", "tb")]
    if handled or level is ErrorLevel.IGNORE:
        assert notes == []
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        return
    assert notes == [
        Notification(level, 7, 3, "Customer Card", 1, "ChildSessionTaskTimeout", "timed out", "tb")
    ]
    expected = logging.WARNING if level is ErrorLevel.WARNING else logging.ERROR
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [expected]


def test_exception_in_error_trigger_is_an_error_notification() -> None:
    def on_error(task_id: int, code: str, text: str, call_stack: str) -> bool:
        raise KeyError("missing")

    notes = dispatch_failure(new_core(), ErrorLevel.IGNORE, on_error)
    (note,) = notes  # the trigger's error only, whatever the task's level
    assert (note.severity, note.code, note.text, note.task_id) == (
        ErrorLevel.ERROR,
        "KeyError",
        "'missing'",
        1,
    )
    assert "in on_error" in note.call_stack


def test_exception_in_completion_trigger_is_an_error_notification(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = new_core()
    notes: list[Notification] = []
    core.on_notification = notes.append
    page = new_page(core)

    def on_completed(task_id: int, results: dict[str, str]) -> None:
        raise ValueError(f"cannot show {results['Count']}")

    page.on_completed = on_completed
    enqueue(core, page, 1, ErrorLevel.IGNORE)
    work = core.receive(completed(1, Count="3"))
    assert work is not None
    run_dispatch(core.dispatch(work))
    (note,) = notes
    assert (note.severity, note.code, note.text) == (
        ErrorLevel.ERROR,
        "ValueError",
        "cannot show 3",
    )
    assert "in on_completed" in note.call_stack
    (record,) = [r for r in caplog.records if r.name == "pbt_server.client"]
    assert record.levelno == logging.ERROR
    assert "cannot show 3" in record.getMessage()


def test_exception_in_notification_callback_is_logged_and_swallowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = new_core()

    def on_notification(note: Notification) -> None:
        raise RuntimeError("display broke")

    core.on_notification = on_notification
    page = new_page(core)
    enqueue(core, page, 1, ErrorLevel.WARNING)
    work = core.receive(failed(1))
    assert work is not None
    run_dispatch(core.dispatch(work))  # does not raise
    assert any("display broke" in (r.exc_text or "") for r in caplog.records)


def test_completion_trigger_gets_id_and_results() -> None:
    core = new_core()
    page = new_page(core)
    seen: list[tuple[int, dict[str, str]]] = []
    page.on_completed = lambda task_id, results: seen.append((task_id, results))
    enqueue(core, page, 5)
    work = core.receive(completed(5, Count="3"))
    assert work is not None
    run_dispatch(core.dispatch(work))
    assert seen == [(5, {"Count": "3"})]


@pytest.mark.parametrize("change", ["close", "record", "session"])
def test_trigger_is_skipped_if_the_page_moved_on_before_dispatch(change: str) -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    task = enqueue(core, page, 1)
    work = core.receive(completed(1, X="1"))
    assert work is task
    if change == "close":
        core.close_page(page)
    elif change == "record":
        core.set_record(page, "Customer: 20000")
    else:
        core.connection_lost("gone")
    run_dispatch(core.dispatch(work))
    assert task._outcome() == {"X": "1"}  # the handle keeps what it was resolved with


def test_pending_request_result() -> None:
    pending = PendingRequest(1, "ping", Flag())
    pending.reply = {"op": "reply", "rid": 1}
    assert pending.result() == {"op": "reply", "rid": 1}
