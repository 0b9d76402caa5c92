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
    Notification,
    PageBase,
    PendingRequest,
    TaskBase,
    Work,
    check_context,
    check_text,
    is_due,
    resolve_addresses,
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
from pbt_server.protocol import MAX_TEXT, REQUESTS, ErrorLevel, FrameDecoder, Message

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


HELLO_REPLY: Message = {"op": "reply", "rid": 1, "session": 7, "server": "t", "max_frame": 1 << 20}


def new_core() -> Core:
    core = Core(max_frame=1 << 20)
    core.welcome(HELLO_REPLY)
    return core


def new_page(core: Core, page_id: int = 3, record: str = "Customer: 10000") -> PageBase:
    page = PageBase(None, page_id, "Customer Card", record)
    core.add_page(page)
    return page


def new_task(page: PageBase) -> TaskBase[PageBase]:
    return TaskBase(page, Flag())


def enqueue(
    core: Core,
    page: PageBase,
    task_id: int,
    level: ErrorLevel | str = ErrorLevel.ERROR,
) -> TaskBase[PageBase]:
    task = new_task(page)
    fields = core.enqueue(page, task, CODEUNIT, {"Wait": "1"}, None, level)
    pending, _ = core.request("enqueue", fields, Flag(), task)
    core.receive({"op": "reply", "rid": pending.rid, "task": task_id, "timeout": 120_000})
    core.take_work()
    task._returned = True  # what the flavour does when the enqueue call returns
    assert task.id == task_id
    return task


def arrive(core: Core, message: Message) -> list[Work]:
    """Feed one broker frame; return the work it made due."""
    core.receive(message)
    return core.take_work()


def dispatch_all(core: Core, work: list[Work]) -> None:
    for item in work:
        run_dispatch(core.dispatch(item))


def signal_count(task: TaskBase[Any]) -> int:
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
    task = new_task(page)
    fields = core.enqueue(page, task, CODEUNIT, {"A": "1"}, 5000, "Warning")
    first, frame = core.request("enqueue", fields, Flag(), task)
    second, _ = core.request("ping", {}, Flag())
    assert (first.rid, second.rid) == (1, 2)
    request = REQUESTS.validate(decode(frame))  # what the broker will check
    assert request == {
        "op": "enqueue",
        "rid": 1,
        "page": 3,
        "codeunit": CODEUNIT,
        "parameters": {"A": "1"},
        "timeout": 5000,
        "level": "Warning",
    }


def test_reply_answers_the_pending_request_once() -> None:
    core = new_core()
    flag = Flag()
    pending, _ = core.request("open_page", {"name": "P", "record": ""}, flag)
    assert arrive(core, {"op": "reply", "rid": pending.rid, "page": 4}) == []
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
    task = new_task(page)
    fields = core.enqueue(page, task, CODEUNIT, None, None, ErrorLevel.ERROR)
    pending, _ = core.request("enqueue", fields, Flag(), task)
    core.receive({"op": "error", "rid": pending.rid, "code": code, "text": "no"})
    with pytest.raises(cls) as caught:
        pending.result()
    assert caught.value.code == code
    assert str(caught.value) == "no"  # the text; the code is .code
    assert task._done is False


def test_error_without_rid_means_the_broker_dropped_us() -> None:
    core = new_core()
    with pytest.raises(ConnectionLost, match="ProtocolError: frame too big"):
        core.receive({"op": "error", "rid": None, "code": "ProtocolError", "text": "frame too big"})


def test_malformed_event_is_a_protocol_error() -> None:
    core = new_core()
    with pytest.raises(ProtocolError):
        core.receive({"op": "completed", "task": "1", "page": 3, "results": {}})


def test_malformed_reply_is_a_protocol_error() -> None:
    core = new_core()
    pending, _ = core.request("open_page", {"name": "P", "record": ""}, Flag())
    with pytest.raises(ProtocolError, match="reply to open_page: missing field 'page'"):
        core.receive({"op": "reply", "rid": pending.rid})


def test_unknown_event_is_ignored() -> None:
    assert arrive(new_core(), {"op": "heartbeat", "task": 1}) == []


def test_status_fields_drop_the_envelope() -> None:
    reply: Message = {"op": "reply", "rid": 9, "sessions": [], "workers": []}
    assert status_fields(reply) == {"sessions": [], "workers": []}


def test_the_tap_sees_every_frame_before_it_is_applied() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    seen: list[tuple[str, bool]] = []
    core.tap = lambda message: seen.append((message["op"], task._done))
    core.receive(completed(1, A="1"))
    core.receive({"op": "shutdown", "code": "ServerShuttingDown", "text": "bye"})
    assert seen == [("completed", False), ("shutdown", True)]


# --- outcomes: arrival, then one decision -------------------------------------------------


def test_arrival_wakes_waiters_and_the_first_look_decides() -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = lambda task_id, results: None
    task = enqueue(core, page, 1)
    assert arrive(core, completed(1, Count="3")) == [task]
    assert signal_count(task) == 1  # a waiter wakes at arrival ...
    assert not task._done  # ... and decides for itself
    core.decide(task)
    assert task._done
    assert task._outcome() == {"Count": "3"}


def test_an_outcome_with_nothing_to_run_is_decided_on_arrival() -> None:
    core = new_core()
    page = new_page(core)
    task = enqueue(core, page, 1)
    assert arrive(core, completed(1)) == []  # no trigger: nothing for the dispatcher
    assert task._done
    assert signal_count(task) == 1
    assert task._outcome() == {}
    ignored = enqueue(core, page, 2, ErrorLevel.IGNORE)
    assert arrive(core, failed(2)) == []  # no error trigger, and nobody to notify
    assert ignored._done
    core.set_record(page, "Customer: 20000")  # decided outcomes stay what they were
    assert task._outcome() == {}
    with pytest.raises(BackgroundTaskError):
        ignored._outcome()


@pytest.mark.parametrize("trigger", ["on_completed", "notification"])
def test_an_outcome_with_something_to_run_waits_for_its_decision(trigger: str) -> None:
    core = new_core()
    page = new_page(core)
    if trigger == "on_completed":
        page.on_completed = lambda task_id, results: None
        task = enqueue(core, page, 1)
        frame = completed(1)
    else:
        task = enqueue(core, page, 1, ErrorLevel.WARNING)  # unhandled: a notification is due
        frame = failed(1)
    assert arrive(core, frame) == [task]
    assert not task._done
    core.set_record(page, "Customer: 20000")  # the page moves on first: no trigger, cancelled
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == "RecordChanged"


def test_failed_resolves_with_background_task_error() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    assert arrive(core, failed(1, "ChildSessionTaskTimeout", "timed out")) == [task]
    core.decide(task)
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
    assert arrive(core, cancelled(1, "Canceled")) == []
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
    arrive(core, first)
    core.decide(task)
    outcome, signals = (task._results, task._error), signal_count(task)
    assert arrive(core, second) == []
    assert (task._results, task._error) == outcome
    assert signal_count(task) == signals


def test_outcome_after_record_change_is_a_cancel_without_trigger() -> None:
    core = new_core()
    page = new_page(core, record="Customer: 10000")
    page.on_completed = never
    task = enqueue(core, page, 1)
    fields = core.set_record(page, "Customer: 20000")  # local first, then the request
    assert fields == {"page": 3, "record": "Customer: 20000"}
    assert page.record_id == "Customer: 20000"
    assert arrive(core, completed(1)) == []
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
    assert arrive(core, failed(1)) == []
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()
    assert caught.value.code == "PageClosed"


@pytest.mark.parametrize(
    ("change", "code"),
    [("record", "RecordChanged"), ("close", "PageClosed"), ("session", "SessionClosed")],
)
def test_a_page_that_moves_on_before_dispatch_gets_a_cancel_not_a_trigger(
    change: str, code: str
) -> None:
    # The outcome is in; the dispatcher has not reached it (busy with another trigger).
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    task = enqueue(core, page, 1)
    work = arrive(core, completed(1, X="1"))
    if change == "record":
        core.set_record(page, "Customer: 20000")
    elif change == "close":
        core.close_page(page)
    else:
        core.close()
    dispatch_all(core, work)
    with pytest.raises(BackgroundTaskCanceled) as caught:
        task._outcome()  # the handle tells the same story as the (absent) trigger
    assert caught.value.code == code


def test_a_decided_outcome_keeps_its_trigger_when_the_page_moves_on_later() -> None:
    core = new_core()
    page = new_page(core)
    seen: list[int] = []
    page.on_completed = lambda task_id, results: seen.append(task_id)
    task = enqueue(core, page, 1)
    work = arrive(core, completed(1, X="1"))
    core.decide(task)  # someone waited on the handle: completed, so its trigger will run
    core.set_record(page, "Customer: 20000")
    dispatch_all(core, work)
    assert task._outcome() == {"X": "1"}
    assert seen == [1]


def test_an_arrived_outcome_is_lost_with_the_connection_and_runs_no_trigger() -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    task = enqueue(core, page, 1)
    work = arrive(core, completed(1, X="1"))
    core.connection_lost("reset")
    dispatch_all(core, work)
    with pytest.raises(ConnectionLost, match="reset"):
        task._outcome()


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


def test_pending_counts_tasks_until_they_are_decided() -> None:
    core = new_core()
    page = new_page(core)
    counts: list[int] = []
    page.on_pending_changed = counts.append
    page.on_completed = lambda task_id, results: None  # so the completion waits for dispatch
    first = enqueue(core, page, 1)
    enqueue(core, page, 2)
    assert page.pending == 2
    run_dispatch(core.dispatch(page))  # the dispatcher tells the count it finds
    assert counts == [2]
    work = arrive(core, completed(1))
    core.receive(cancelled(2))
    work += core.take_work()
    assert page.pending == 1  # the cancel is decided; the completion waits for dispatch
    dispatch_all(core, work)
    dispatch_all(core, core.take_work())
    assert first._done
    assert page.pending == 0
    assert counts == [2, 1, 0] or counts == [2, 0]  # told when it changed; never twice the same


def test_clean_end_of_stream_says_the_server_closed_it() -> None:
    core = new_core()
    core.connection_lost()
    with pytest.raises(ConnectionLost, match="the server closed the connection"):
        core.check_open()


def test_after_shutdown_event_its_text_is_the_reason() -> None:
    core = new_core()
    task = enqueue(core, new_page(core), 1)
    core.receive({"op": "shutdown", "code": "ServerShuttingDown", "text": "pbt-server stop"})
    assert not task._done  # the broker closes the connection next
    core.connection_lost("[Errno 32] Broken pipe")
    with pytest.raises(ConnectionLost, match="the server shut down: pbt-server stop"):
        task._outcome()


def test_malformed_reply_stays_pending_until_the_connection_is_dropped() -> None:
    core = new_core()
    page = new_page(core)
    task = new_task(page)
    flag = Flag()
    pending, _ = core.request(
        "enqueue", core.enqueue(page, task, 1, None, None, "Error"), flag, task
    )
    with pytest.raises(ProtocolError):
        core.receive({"op": "reply", "rid": pending.rid, "task": "1", "timeout": 1})
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
    assert core.cancel(page, 1) is False  # cancel never raises for a broken link


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
        core.enqueue(page, new_task(page), CODEUNIT, None, None, "Error")
    with pytest.raises(ClientClosed):
        core.cancel(page, 1)
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
    core.receive(HELLO_REPLY | {"rid": pending.rid})
    assert flag.count == 0
    core.connection_lost("late")
    assert flag.count == 0  # no longer pending


@pytest.mark.parametrize("reply_first", [False, True])
def test_an_abandoned_enqueue_cancels_its_task_once_the_id_is_known(reply_first: bool) -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    task = new_task(page)
    fields = core.enqueue(page, task, CODEUNIT, None, None, "Error")
    pending, _ = core.request("enqueue", fields, Flag(), task)
    reply: Message = {"op": "reply", "rid": pending.rid, "task": 5, "timeout": 1000}
    if reply_first:  # the reply arrived, but the caller was cancelled before it resumed
        core.receive(reply)
        core.abandon(pending)
    else:
        core.abandon(pending)
        assert core.take_orphans() == []
        core.receive(reply)
    (frame,) = core.take_orphans()
    assert decode(frame)["task"] == 5  # no task without an owner
    assert REQUESTS.validate(decode(frame))["op"] == "cancel"
    with pytest.raises(BackgroundTaskCanceled):
        task._outcome()
    dispatch_all(core, arrive(core, completed(5)))  # its late outcome changes nothing
    assert page.pending == 0


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
    task = new_task(page)

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
    task = new_task(page)
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
        core.enqueue(page, new_task(page), CODEUNIT, None, None, "Error")
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


def test_context_is_checked_and_copied() -> None:
    original = {"user": "ALICE", "company": "CRONUS"}
    copy = check_context(original)
    original["user"] = "MALLORY"
    assert copy == {"user": "ALICE", "company": "CRONUS"}
    assert check_context(None) == {}
    with pytest.raises(TypeError, match="context"):
        check_context({"user": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at most 64"):
        check_context({str(i): "" for i in range(65)})


def test_cancel_asks_the_broker_only_about_this_pages_pending_tasks() -> None:
    core = new_core()
    page, other = new_page(core, 3), new_page(core, 4)
    enqueue(core, page, 1)
    assert core.cancel(page, 1) is None  # the broker must be asked
    assert core.cancel(other, 1) is False
    assert core.cancel(page, 2) is False
    assert core.cancel(page, True) is False
    assert core.cancel(page, "1") is False


def test_cancel_of_an_arrived_outcome_decides_it_cancelled_here() -> None:
    core = new_core()
    page = new_page(core)
    page.on_completed = never
    task = enqueue(core, page, 1)
    work = arrive(core, completed(1))
    assert core.cancel(page, 1) is True  # the trigger had not run: it never will
    dispatch_all(core, work)
    with pytest.raises(BackgroundTaskCanceled):
        task._outcome()
    assert core.cancel(page, 1) is False  # decided now


def test_resolve_addresses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PBT_SOCKET", raising=False)
    assert resolve_addresses(None) == [DEFAULT_SOCKET]
    monkeypatch.setenv("PBT_SOCKET", "/run/pbt.sock")
    assert resolve_addresses(None) == ["/run/pbt.sock"]
    assert resolve_addresses(tmp_path / "s.sock") == [str(tmp_path / "s.sock")]
    assert resolve_addresses(("127.0.0.1", 7085)) == [("127.0.0.1", 7085)]
    both: list[Any] = [("10.0.0.1", 7085), "/run/pbt.sock"]
    assert resolve_addresses(both) == both
    with pytest.raises(TypeError):
        resolve_addresses(("127.0.0.1", "7085"))
    with pytest.raises(ValueError, match="empty"):
        resolve_addresses([])


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
    work = arrive(core, failed(1, "ChildSessionTaskTimeout", "timed out"))
    # With nothing to run (no error trigger, level Ignore) it is decided on arrival.
    assert work == ([] if on_error is None and level is ErrorLevel.IGNORE else [task])
    dispatch_all(core, work)
    assert task._done
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
    dispatch_all(core, arrive(core, completed(1, Count="3")))
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
    dispatch_all(core, arrive(core, failed(1)))  # does not raise
    assert any("display broke" in (r.exc_text or "") for r in caplog.records)


def test_completion_trigger_gets_id_and_results() -> None:
    core = new_core()
    page = new_page(core)
    seen: list[tuple[int, dict[str, str]]] = []
    page.on_completed = lambda task_id, results: seen.append((task_id, results))
    enqueue(core, page, 5)
    dispatch_all(core, arrive(core, completed(5, Count="3")))
    assert seen == [(5, {"Count": "3"})]


def test_pending_request_result() -> None:
    pending = PendingRequest(1, "ping", Flag())
    pending.reply = {"op": "reply", "rid": 1}
    assert pending.result() == {"op": "reply", "rid": 1}


# --- progress -----------------------------------------------------------------------------


def progress(task_id: int, done: int) -> Message:
    return {"op": "progress", "task": task_id, "page": 3, "progress": {"done": str(done)}}


def test_progress_updates_are_folded_into_one_call_with_the_latest() -> None:
    core = new_core()
    page = new_page(core)
    seen: list[tuple[int, dict[str, str]]] = []
    page.on_progress = lambda task_id, value: seen.append((task_id, value))
    task = enqueue(core, page, 9)
    work = arrive(core, progress(9, 1))
    work += arrive(core, progress(9, 2))  # before the dispatcher got to the first
    assert len(work) == 1
    assert task.progress == {"done": "2"}
    dispatch_all(core, work)
    assert seen == [(9, {"done": "2"})]
    dispatch_all(core, arrive(core, progress(9, 3)))
    assert seen[-1] == (9, {"done": "3"})


def test_no_progress_call_once_the_outcome_arrived_or_the_page_moved_on() -> None:
    core = new_core()
    page = new_page(core)
    page.on_progress = never
    page.on_completed = lambda task_id, results: None
    task = enqueue(core, page, 9)
    work = arrive(core, progress(9, 1)) + arrive(core, completed(9))
    run_dispatch(core.dispatch(work[0]))  # the progress note, reached after the outcome
    other = enqueue(core, page, 10)
    work = arrive(core, progress(10, 1))
    core.set_record(page, "Customer: 20000")
    dispatch_all(core, work)
    assert arrive(core, progress(10, 2)) == []  # moved on: not even kept
    assert other.progress == {"done": "1"}
    assert task.progress == {"done": "1"}  # the last value stays readable


def test_a_raising_progress_trigger_is_an_error_notification() -> None:
    core = new_core()
    page = new_page(core)
    notes: list[Notification] = []
    core.on_notification = notes.append

    def bad(task_id: int, value: dict[str, str]) -> None:
        raise RuntimeError("bar broke")

    page.on_progress = bad
    enqueue(core, page, 9)
    dispatch_all(core, arrive(core, progress(9, 1)))
    assert [(n.task_id, n.code, n.text) for n in notes] == [(9, "RuntimeError", "bar broke")]


def test_progress_waits_for_the_taskid_like_a_trigger() -> None:
    core = new_core()
    page = new_page(core)
    page.on_progress = lambda task_id, value: None
    task = new_task(page)
    fields = core.enqueue(page, task, CODEUNIT, {}, None, ErrorLevel.ERROR)
    pending, _ = core.request("enqueue", fields, Flag(), task)
    core.receive({"op": "reply", "rid": pending.rid, "task": 4, "timeout": 1000})
    (note,) = arrive(core, progress(4, 1))
    assert not is_due(note)
    task._returned = True
    assert is_due(note)
