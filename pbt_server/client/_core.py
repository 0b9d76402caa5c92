"""The client's logic, free of I/O: shared by the blocking and the asyncio flavour.

::

    caller ──request()──> frame ──(flavour sends)──> broker
                                                       │
    broker frames ──(flavour reads)──> receive(message)
        reply / error    -> the PendingRequest is answered, its signal set
        completed/failed -> the TaskState is resolved, its signal set, and the task
                            is returned as dispatch work
        cancelled        -> the TaskState is resolved; no work
        shutdown         -> remembered for the ConnectionLost text
    dispatch work ──(the flavour's one dispatcher)──> dispatch(task): a generator that
        yields the callbacks to call, one at a time, and decides what follows

A flavour creates the signals (a lock-based latch, an ``asyncio.Event``) and waits on them;
the core only calls ``signal.set()``. The core is not thread-safe: the blocking flavour calls
it under one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from collections.abc import Callable, Generator, Mapping
from enum import StrEnum
from typing import Any, Final, Generic, Protocol, TypeVar

from pbt_server.errors import (
    CANCELED_PAGE_CLOSED,
    CANCELED_RECORD_CHANGED,
    CANCELED_SESSION_CLOSED,
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ClientClosed,
    ConnectionLost,
    InvalidParameters,
    PageClosed,
    PbtError,
    ProtocolError,
    error_from_wire,
)
from pbt_server.protocol import MAX_PARAMETERS, MAX_TEXT, Message, encode_frame

logger: Final = logging.getLogger("pbt_server.client")

DEFAULT_SOCKET: Final = "var/pbt.sock"
_INT64_MAX: Final = (1 << 63) - 1
_CANCELLING_OPS: Final = {"set_record": CANCELED_RECORD_CHANGED, "close_page": CANCELED_PAGE_CLOSED}

Address = str | tuple[str, int]
CompletedTrigger = Callable[[int, dict[str, str]], object]
ErrorTrigger = Callable[[int, str, str, str], object]
Call = tuple[Callable[..., object], tuple[object, ...]]
T = TypeVar("T")


class ErrorLevel(StrEnum):
    """How an error that the page's error trigger did not handle is surfaced."""

    IGNORE = "Ignore"
    WARNING = "Warning"
    ERROR = "Error"


_LEVELS: Final = frozenset(level.value for level in ErrorLevel)


@dataclasses.dataclass(frozen=True, slots=True)
class Notification:
    """An unhandled task error, or an exception raised inside a trigger (severity ERROR)."""

    severity: ErrorLevel
    session_id: int
    page_id: int
    page_name: str
    task_id: int
    code: str
    text: str
    call_stack: str


NotificationCallback = Callable[[Notification], object]


class Signal(Protocol):
    """What the core needs of a flavour's wake-up primitive."""

    def set(self) -> None: ...


class PageState:
    """A page's bookkeeping; the public ``Page`` classes extend it with I/O."""

    def __init__(self, page_id: int, name: str, record_id: str) -> None:
        self._id = page_id
        self._name = name
        self._record_id = record_id
        self._closed = False
        #: ``on_completed(task_id, results)``, run on the dispatcher; ``None`` drops results.
        self.on_completed: CompletedTrigger | None = None
        #: ``on_error(task_id, code, text, call_stack) -> is_handled``, run on the dispatcher.
        self.on_error: ErrorTrigger | None = None

    @property
    def id(self) -> int:
        """The page id the broker assigned."""
        return self._id

    @property
    def name(self) -> str:
        """The page name given to ``open_page``."""
        return self._name

    @property
    def record_id(self) -> str:
        """The page's current record id (tasks are enqueued under it)."""
        return self._record_id

    @property
    def closed(self) -> bool:
        """True once the page (or its session) was closed or the connection was lost."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._id} {self._name!r} {self._record_id!r} {state}>"


P = TypeVar("P", bound=PageState)


class TaskState(Generic[P]):
    """A task's bookkeeping and outcome; the public ``BackgroundTask`` classes extend it."""

    def __init__(self, page: P, signal: Signal) -> None:
        self._page = page
        self._signal = signal
        self._id = 0
        self._record_id = page.record_id
        self._error_level = ErrorLevel.ERROR
        self._timeout = 0
        self._done = False
        self._results: dict[str, str] | None = None
        self._error: PbtError | None = None

    @property
    def id(self) -> int:
        """The task id (``TaskId``), positive and unique within the session."""
        return self._id

    @property
    def page(self) -> P:
        """The page that enqueued the task."""
        return self._page

    @property
    def record_id(self) -> str:
        """The page's record id when the task was enqueued."""
        return self._record_id

    @property
    def error_level(self) -> ErrorLevel:
        """How an unhandled failure of this task is surfaced."""
        return self._error_level

    @property
    def timeout(self) -> int:
        """The timeout the broker applies, in milliseconds (after defaulting and clamping)."""
        return self._timeout

    def done(self) -> bool:
        """Return True once the task has its outcome (results, error or cancellation)."""
        return self._done

    def _outcome(self) -> dict[str, str]:
        if self._error is not None:
            raise self._error
        assert self._results is not None
        return self._results

    def __repr__(self) -> str:
        if not self._done:
            state = "pending"
        elif self._error is None:
            state = "completed"
        else:
            state = self._error.code
        return f"<{type(self).__name__} {self._id} page={self._page.id} {state}>"


@dataclasses.dataclass(slots=True, eq=False)
class PendingRequest:
    """A request waiting for its answer; ``task`` is set for an enqueue."""

    rid: int
    op: str
    signal: Signal
    task: TaskState[Any] | None = None
    reply: Message | None = None
    error: PbtError | None = None

    def result(self) -> Message:
        """The reply's fields, or raise the error that answered it."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


def resolve_address(address: str | os.PathLike[str] | tuple[str, int] | None) -> Address:
    """A Unix socket path or a ``(host, port)`` pair; ``None`` means ``$PBT_SOCKET``."""
    if address is None:
        return os.environ.get("PBT_SOCKET") or DEFAULT_SOCKET
    if isinstance(address, tuple):
        host, port = address
        if not isinstance(host, str) or type(port) is not int:
            raise TypeError(f"a TCP address is (host: str, port: int), not {address!r}")
        return (host, port)
    return os.fspath(address)


def describe_address(address: Address) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address


def check_text(name: str, value: object) -> str:
    """Check a page name or record id before it goes on the wire."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{name} is longer than {MAX_TEXT} characters")
    return value


def field(message: Message, name: str, kind: type[T]) -> T:
    """``message[name]`` if it is a ``kind``; else the broker broke the protocol."""
    value = message.get(name)
    if not isinstance(value, kind):
        raise ProtocolError(f"{message['op']}: field {name!r} must be {kind.__name__}")
    return value


def _parameters(parameters: Mapping[str, str] | None) -> dict[str, str]:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise InvalidParameters(f"parameters must be a mapping, not {type(parameters).__name__}")
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidParameters(f"more than {MAX_PARAMETERS} parameters")
    copy: dict[str, str] = {}
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise InvalidParameters(f"parameter key {key!r:.80} is {type(key).__name__}, not str")
        if not isinstance(value, str):
            raise InvalidParameters(
                f"parameter {key!r:.80}: value is {type(value).__name__}, not str"
            )
        copy[key] = value
    return copy


class Core:
    """Requests, pages and tasks of one session, and what each broker frame does to them."""

    def __init__(self, *, max_frame: int) -> None:
        self.max_frame = max_frame
        self.refusal: PbtError | None = None  # the broker's reason for refusing us before hello
        self.session_id = 0
        self.on_notification: NotificationCallback | None = None
        # Sees every broker frame before it is applied (tracing, test harnesses). It runs
        # where frames are read (the reader thread, or the event loop) and must not block.
        self.tap: Callable[[Message], None] | None = None
        self._next_rid = 1
        self._pending: dict[int, PendingRequest] = {}
        self._pages: dict[int, PageState] = {}
        self._tasks: dict[int, TaskState[Any]] = {}  # accepted and not yet resolved
        self._closed_by_user = False
        self._lost: str | None = None
        self._shutdown_text: str | None = None

    @property
    def ended(self) -> bool:
        """True after ``close()`` or ``connection_lost()``."""
        return self._closed_by_user or self._lost is not None

    def check_open(self) -> None:
        """Raise ClientClosed (you closed it) or ConnectionLost (it broke)."""
        if self.ended:
            raise self.ended_error()

    def ended_error(self) -> PbtError:
        """The error for a call on an ended session: whose fault it was."""
        if self._closed_by_user:
            return ClientClosed("this session was closed")
        return ConnectionLost(self._lost or "the connection is closed")

    # --- requests ----------------------------------------------------------------------

    def request(
        self,
        op: str,
        fields: dict[str, object],
        signal: Signal,
        task: TaskState[Any] | None = None,
    ) -> tuple[PendingRequest, bytes]:
        """Register a request and return it with the frame to send."""
        self.check_open()
        rid = self._next_rid
        frame = encode_frame({"op": op, "rid": rid, **fields})
        size = len(frame) - 4
        if size > self.max_frame:
            raise InvalidParameters(
                f"{op} request of {size} bytes is over the {self.max_frame}-byte frame limit"
            )
        self._next_rid = rid + 1
        pending = PendingRequest(rid, op, signal, task)
        self._pending[rid] = pending
        return pending, frame

    def abandon(self, pending: PendingRequest) -> None:
        """Forget a request whose caller stopped waiting; a late answer is ignored."""
        self._pending.pop(pending.rid, None)

    def welcome(self, reply: Message) -> int:
        """Take the hello reply; return the largest frame the broker may send (and accepts)."""
        self.session_id = field(reply, "session", int)
        announced = reply.get("max_frame")
        if type(announced) is int and announced > 0:
            self.max_frame = announced  # what the broker accepts from us
            return announced
        return 0

    def add_page(self, page: PageState) -> None:
        if self.ended:
            page._closed = True
        else:
            self._pages[page.id] = page

    def close_page(self, page: PageState) -> bool:
        """Mark ``page`` closed before close_page is sent; False if it already was."""
        if page._closed:
            return False
        self.check_open()
        page._closed = True  # from now on its outcomes are cancellations (dispatch-time check)
        self._pages.pop(page.id, None)
        return True

    def set_record(self, page: PageState, record_id: object) -> dict[str, object]:
        """Change the page's record locally, before the request is sent."""
        record_id = check_text("record_id", record_id)
        self.check_open()
        if page._closed:
            raise ClientClosed(f"page {page.name!r} was closed")
        page._record_id = record_id
        return {"page": page.id, "record": record_id}

    def enqueue(
        self,
        page: PageState,
        task: TaskState[Any],
        codeunit_id: object,
        parameters: Mapping[str, str] | None,
        timeout: object,
        error_level: object,
    ) -> dict[str, object]:
        """Validate the arguments of an enqueue and return the request fields."""
        self.check_open()
        if page._closed:
            raise PageClosed(f"page {page.name!r} is closed")
        if type(codeunit_id) is not int:
            raise InvalidParameters(f"codeunit_id must be an int, not {type(codeunit_id).__name__}")
        if not 0 <= codeunit_id <= _INT64_MAX:
            raise InvalidParameters(f"codeunit_id {codeunit_id} is out of range")
        if timeout is not None and (type(timeout) is not int or abs(timeout) > _INT64_MAX):
            raise InvalidParameters(
                f"timeout must be None or an int of milliseconds, not {timeout!r}"
            )
        if not isinstance(error_level, str) or error_level not in _LEVELS:
            raise InvalidParameters(f"error_level must be an ErrorLevel, not {error_level!r}")
        level = ErrorLevel(error_level)
        task._record_id = page.record_id
        task._error_level = level
        return {
            "page": page.id,
            "codeunit": codeunit_id,
            "parameters": _parameters(parameters),
            "timeout": timeout,
            "level": level.value,
        }

    def should_cancel(self, page: PageState, task_id: object) -> bool:
        """Whether a cancel is worth sending: the task is this page's and still unresolved."""
        if self._closed_by_user:
            raise ClientClosed("this session was closed")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            return False
        task = self._tasks.get(task_id)
        return task is not None and task.page is page

    # --- frames from the broker ----------------------------------------------------------

    def receive(self, message: Message) -> TaskState[Any] | None:
        """Apply one broker frame; return a task whose trigger is due, if any.

        Raises:
            ProtocolError: the frame is malformed.
            ConnectionLost: the broker refused the connection as a whole.
        """
        if self.tap is not None:
            self.tap(message)
        op = message["op"]
        if op == "reply" or op == "error":
            self._answer(message)
            return None
        if op == "completed" or op == "failed" or op == "cancelled":
            return self._outcome(message)
        if op == "shutdown":
            self._shutdown_text = str(message.get("text", ""))
            logger.info("the server is shutting down: %s", self._shutdown_text)
        else:
            logger.debug("ignored unknown event %r", op)
        return None

    def _answer(self, message: Message) -> None:
        rid = message.get("rid")
        error: PbtError | None = None
        if message["op"] == "error":
            code, text = field(message, "code", str), field(message, "text", str)
            if rid is None:
                # Refused before it could answer our hello (e.g. ServerBusy): connect() raises
                # the server's own reason, as it does for AuthenticationFailed, whether or not
                # our hello was out yet.
                if self.session_id == 0:
                    self.refusal = error_from_wire(code, text)
                hello = next((p for p in self._pending.values() if p.op == "hello"), None)
                if hello is None:
                    raise ConnectionLost(f"the server refused this connection: {code}: {text}")
                rid = hello.rid
            error = error_from_wire(code, text)
        pending = self._pending.get(rid) if type(rid) is int else None
        if pending is None:
            logger.debug("ignored an answer to unknown request %r", rid)
            return
        # Checked before the request leaves _pending: if the reply is malformed, the
        # connection_lost() that follows still wakes its caller.
        if error is not None:
            pending.error = error
        elif pending.task is not None:
            self._accept(pending.task, message)
        elif pending.op in _CANCELLING_OPS:
            # The broker sends the cancelled events first; this only mops up.
            for task_id in field(message, "cancelled", list):
                task = self._tasks.get(task_id) if type(task_id) is int else None
                if task is not None:
                    self._cancel(task, _CANCELLING_OPS[pending.op], "")
        pending.reply = message
        del self._pending[pending.rid]
        pending.signal.set()

    def _accept(self, task: TaskState[Any], reply: Message) -> None:
        # Registered here, on the reading side, because the task's outcome event may be the
        # very next frame: before the caller that asked has even been woken.
        task._id = field(reply, "task", int)
        task._timeout = field(reply, "timeout", int)
        self._tasks[task._id] = task

    def _outcome(self, message: Message) -> TaskState[Any] | None:
        op = message["op"]
        task_id = field(message, "task", int)
        task = self._tasks.get(task_id)
        if task is None:
            logger.debug("ignored %s event for task %d: unknown or already ended", op, task_id)
            return None
        if op == "cancelled":
            code = field(message, "code", str)
            self._cancel(task, code, field(message, "text", str))
            return None
        page = task.page
        # BC's dispatch-time check: an outcome for a page that closed or moved on is a cancel.
        if page.closed:
            self._cancel(task, CANCELED_PAGE_CLOSED, f"page {page.name!r} was closed")
            return None
        if page.record_id != task.record_id:
            text = f"the page's record changed from {task.record_id!r} to {page.record_id!r}"
            self._cancel(task, CANCELED_RECORD_CHANGED, text)
            return None
        if op == "completed":
            self._resolve(task, field(message, "results", dict), None)
            return task if page.on_completed is not None else None
        error = BackgroundTaskError(
            field(message, "text", str),
            code=field(message, "code", str),
            call_stack=field(message, "stack", str),
            task_id=task_id,
        )
        self._resolve(task, None, error)
        return task

    def _cancel(self, task: TaskState[Any], code: str, text: str) -> None:
        text = text or f"task {task.id} was cancelled"
        self._resolve(task, None, BackgroundTaskCanceled(text, code=code, task_id=task.id))

    def _resolve(
        self, task: TaskState[Any], results: dict[str, str] | None, error: PbtError | None
    ) -> None:
        del self._tasks[task.id]
        task._results = results
        task._error = error
        task._done = True
        task._signal.set()

    # --- the end -------------------------------------------------------------------------

    def connection_lost(self, reason: str | None = None) -> None:
        """Fail every pending request and unresolved task with ConnectionLost.

        ``reason`` says what broke (``None``: a clean end of stream); after a ``shutdown``
        event the broker's own text is the reason, whatever the socket said.
        """
        if self.ended:
            return
        if self._shutdown_text is not None:
            reason = f"the server shut down: {self._shutdown_text}"
        elif reason is None:
            reason = "the server closed the connection"
        self._lost = reason
        self._end(lambda: ConnectionLost(reason), lambda task: ConnectionLost(reason))

    def close(self) -> None:
        """The user closed the session: pending requests fail, tasks end cancelled."""
        ended = self.ended
        self._closed_by_user = True
        if ended:
            return
        self._end(
            lambda: ClientClosed("the session was closed"),
            lambda task: BackgroundTaskCanceled(
                f"the session was closed before task {task.id} ended",
                code=CANCELED_SESSION_CLOSED,
                task_id=task.id,
            ),
        )

    def _end(
        self,
        request_error: Callable[[], PbtError],
        task_error: Callable[[TaskState[Any]], PbtError],
    ) -> None:
        for page in self._pages.values():
            page._closed = True  # queued triggers are skipped: the session is over
        self._pages.clear()
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.error = request_error()
            request.signal.set()
        for task in list(self._tasks.values()):
            self._resolve(task, None, task_error(task))

    # --- triggers ------------------------------------------------------------------------

    def dispatch(self, task: TaskState[Any]) -> Generator[Call, object, None]:
        """Run one task's trigger and its error-level handling, step by step.

        Yields ``(callback, args)``; the driver calls it and sends back its return value, or
        throws in the exception it raised. Exceptions from triggers become ERROR
        notifications; an exception from ``on_notification`` is logged and swallowed.
        """
        page = task.page
        if page.closed or page.record_id != task.record_id:
            logger.debug("task %d: page closed or record changed; trigger skipped", task.id)
            return
        error = task._error
        note: Notification | None = None
        try:
            if error is None:
                if page.on_completed is not None:
                    yield page.on_completed, (task.id, task._results)
            else:
                assert isinstance(error, BackgroundTaskError)
                handled: object = False
                if page.on_error is not None:
                    args = (task.id, error.code, error.text, error.call_stack)
                    handled = yield page.on_error, args
                if not handled and task.error_level is not ErrorLevel.IGNORE:
                    note = self._notification(
                        task, task.error_level, error.code, error.text, error.call_stack
                    )
        except GeneratorExit:
            raise
        except BaseException as exc:  # a trigger raised: always severity ERROR (BC)
            # BaseException too: a trigger's SystemExit must not end the dispatcher, or no
            # later trigger would ever run.
            stack = "".join(traceback.format_exception(exc))
            note = self._notification(task, ErrorLevel.ERROR, type(exc).__name__, str(exc), stack)
        if note is None:
            return
        level = logging.WARNING if note.severity is ErrorLevel.WARNING else logging.ERROR
        logger.log(
            level,
            "page %r (%d) task %d: %s: %s%s",
            note.page_name,
            note.page_id,
            note.task_id,
            note.code,
            note.text,
            f"\n{note.call_stack}" if note.call_stack else "",
        )
        callback = self.on_notification
        if callback is None:
            return
        try:
            yield callback, (note,)
        except GeneratorExit:
            raise
        except BaseException:
            logger.exception("on_notification raised; ignored")

    def _notification(
        self, task: TaskState[Any], severity: ErrorLevel, code: str, text: str, stack: str
    ) -> Notification:
        page = task.page
        return Notification(
            severity, self.session_id, page.id, page.name, task.id, code, text, stack
        )


class SessionBase:
    """What both flavours' ``Session`` share: the core and the read-only state."""

    def __init__(self, core: Core, address: Address) -> None:
        self._core = core
        self._address = address

    @property
    def id(self) -> int:
        """The session id the broker assigned in its hello reply."""
        return self._core.session_id

    @property
    def address(self) -> Address:
        """The Unix socket path or ``(host, port)`` this session is connected to."""
        return self._address

    @property
    def closed(self) -> bool:
        """True after ``close()`` or once the connection was lost."""
        return self._core.ended

    @property
    def on_notification(self) -> NotificationCallback | None:
        """Called with a :class:`Notification` per unhandled task error, on the dispatcher."""
        return self._core.on_notification

    @on_notification.setter
    def on_notification(self, callback: NotificationCallback | None) -> None:
        self._core.on_notification = callback

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.id} {describe_address(self._address)} {state}>"


def status_fields(reply: Message) -> dict[str, object]:
    """The fields of a status reply, without the envelope."""
    return {key: value for key, value in reply.items() if key not in ("op", "rid")}


def run_dispatch(steps: Generator[Call, object, None]) -> None:
    """Drive :meth:`Core.dispatch` with plain calls (the blocking flavour, and tests)."""
    try:
        callback, args = next(steps)
        while True:
            try:
                value = callback(*args)
            except BaseException as exc:  # Core.dispatch reports it; the dispatcher goes on
                callback, args = steps.throw(exc)
            else:
                callback, args = steps.send(value)
    except StopIteration:
        pass
