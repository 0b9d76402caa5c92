"""The client's logic, free of I/O: shared by the blocking and the asyncio flavour.

::

    caller ──request()──> frame ──(flavour sends)──> broker
                                                       │
    broker frames ──(flavour reads)──> receive(message)
        reply / error    -> the PendingRequest is answered, its signal set
        completed/failed -> the outcome is stored on the task, its signal set (waiters
                            wake), and the task becomes dispatch work (decided at once
                            when it has no trigger to run)
        cancelled        -> the task is decided: cancelled; no trigger
        progress         -> the task's latest progress replaced; one ProgressNote queued
                            (while none is) if its page has on_progress
        shutdown         -> remembered for the ConnectionLost text
    take_work() ──(the flavour's one dispatcher)──> dispatch(work): a generator that
        yields the callbacks to call, one at a time, and decides what follows

One decision per task. An outcome that arrived is *decided* — the handle resolved and, if
completed or failed, its trigger bound to run — at the first of: the dispatcher reaching it,
a caller taking it from the handle (``result()``, ``exception()``), or the page moving on
(``set_record``, ``close``, ``cancel_background_task``: then it is decided cancelled and no
trigger runs). An outcome with nothing to run (no trigger set on its page, no notification
due) is decided where it arrives, as the dispatcher would at once. So a handle and its
triggers always tell the same story, a waiting caller never waits on the dispatcher (a
trigger may wait for another task without deadlock), and a page that moved on never gets a
trigger for the record it left.

TaskId first. A flavour runs a task's trigger only once the call that returned its TaskId has
returned (``TaskBase.returned``): code that remembers the id and matches it in the trigger
never misses one.

A flavour creates the signals (a lock-based latch, an ``asyncio.Event``) and waits on them;
the core only calls ``signal.set()``. The core is not thread-safe: the blocking flavour calls
it under one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

from pbt_server.codeunits import in_child_session
from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    CancelReason,
    ClientClosed,
    ConnectionLost,
    InvalidParameters,
    NotAllowed,
    PageClosed,
    PbtError,
    error_from_wire,
)
from pbt_server.protocol import (
    EVENTS,
    INT64_MAX,
    MAX_CONTEXT,
    MAX_PARAMETERS,
    MAX_TEXT,
    ErrorLevel,
    Message,
    encode_frame,
    validate_reply,
)

logger: Final = logging.getLogger("pbt_server.client")

DEFAULT_SOCKET: Final = "var/pbt.sock"
DEFAULT_KEEPALIVE: Final = 15.0  # seconds of silence before a ping; as long again for its answer
_CANCELLING_OPS: Final = {
    "set_record": CancelReason.RECORD_CHANGED,
    "close_page": CancelReason.PAGE_CLOSED,
}

Address = str | tuple[str, int]
CompletedTrigger = Callable[[int, dict[str, str]], object]
ProgressTrigger = Callable[[int, dict[str, str]], object]
ErrorTrigger = Callable[[int, str, str, str], object]
PendingTrigger = Callable[[int], object]
Call = tuple[Callable[..., object], tuple[object, ...]]
T = TypeVar("T")


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


class PageBase:
    """A page's bookkeeping and the members both flavours' ``Page`` share."""

    def __init__(self, session: Any, page_id: int, name: str, record_id: str) -> None:
        self._session = session
        self._id = page_id
        self._name = name
        self._record_id = record_id
        self._closed = False
        self._pending = 0  # tasks enqueued and not yet decided
        self._pending_told = 0  # the count on_pending_changed last heard
        self._undecided: dict[int, TaskBase[Any]] = {}  # outcome arrived, not yet decided
        #: ``on_completed(task_id, results)``, run on the dispatcher; ``None`` drops results.
        self.on_completed: CompletedTrigger | None = None
        #: ``on_error(task_id, code, text, call_stack) -> is_handled``, run on the dispatcher.
        self.on_error: ErrorTrigger | None = None
        #: ``on_pending_changed(count)``, run on the dispatcher when :attr:`pending` changed:
        #: what a cue needs to show ``-`` while its tasks run.
        self.on_pending_changed: PendingTrigger | None = None
        #: ``on_progress(task_id, progress)``, run on the dispatcher with a running task's
        #: latest ``ctx.set_progress`` value; never once its outcome has arrived.
        self.on_progress: ProgressTrigger | None = None
        #: The error of the last refused ``try_enqueue_background_task`` (``.code`` says why).
        self.last_enqueue_error: PbtError | None = None

    @property
    def session(self) -> Any:
        """The session this page belongs to."""
        return self._session

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

    @property
    def pending(self) -> int:
        """Tasks of this page enqueued and not yet ended (completed, failed or cancelled)."""
        return self._pending

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._id} {self._name!r} {self._record_id!r} {state}>"


P = TypeVar("P", bound=PageBase)


class TaskBase(Generic[P]):
    """A task's bookkeeping and outcome; the public ``BackgroundTask`` classes extend it."""

    def __init__(self, page: P, signal: Signal) -> None:
        self._page = page
        self._signal = signal
        self._id = 0
        self._record_id = page.record_id
        self._error_level = ErrorLevel.ERROR
        self._timeout = 0
        self._arrived: tuple[dict[str, str] | None, PbtError | None] | None = None
        self._done = False  # decided
        self._returned = False  # the call that returned the TaskId has returned
        self._results: dict[str, str] | None = None
        self._error: PbtError | None = None
        self._progress: dict[str, str] | None = None
        self._progress_seq = 0  # progress updates received
        self._progress_due = False  # a ProgressNote for it waits for the dispatcher
        self._progress_told = 0  # the update on_progress last ran with
        self._watchers: list[Signal] | None = None  # woken by progress and by the outcome

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

    @property
    def progress(self) -> dict[str, str] | None:
        """The latest progress the codeunit reported (``ctx.set_progress``), a copy; None
        until the first. It stays what it last was once the task has ended."""
        progress = self._progress
        return None if progress is None else dict(progress)

    def _outcome(self) -> dict[str, str]:
        if self._error is not None:
            raise self._error
        assert self._results is not None
        return self._results

    def __repr__(self) -> str:
        if not self._done:
            state = "pending" if self._arrived is None else "arrived"
        elif self._error is None:
            state = "completed"
        else:
            state = self._error.code
        return f"<{type(self).__name__} {self._id} page={self._page.id} {state}>"


@dataclasses.dataclass(slots=True, eq=False)
class ProgressNote:
    """Dispatcher work: run ``on_progress`` with the task's latest progress (the value when
    the dispatcher gets to it: updates that arrive meanwhile are folded into this one)."""

    task: TaskBase[Any]


Work = TaskBase[Any] | PageBase | ProgressNote


@dataclasses.dataclass(slots=True, eq=False)
class PendingRequest:
    """A request waiting for its answer; ``task`` is set for an enqueue."""

    rid: int
    op: str
    signal: Signal
    task: TaskBase[Any] | None = None
    reply: Message | None = None
    error: PbtError | None = None
    orphaned: bool = False  # its caller gave up; an accepted task is cancelled at once

    def result(self) -> Message:
        """The reply's fields, or raise the error that answered it."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


AddressArg = str | os.PathLike[str] | tuple[str, int]


def resolve_addresses(address: AddressArg | Sequence[AddressArg] | None) -> list[Address]:
    """Unix socket paths and ``(host, port)`` pairs to try, in order; ``None`` means
    ``$PBT_SOCKET`` or ``var/pbt.sock``."""
    if address is None:
        return [os.environ.get("PBT_SOCKET") or DEFAULT_SOCKET]
    if isinstance(address, list):
        if not address:
            raise ValueError("the list of addresses is empty")
        return [_one_address(item) for item in address]
    return [_one_address(address)]


def _one_address(address: object) -> Address:
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[0], str) or type(address[1]) is not int:
            raise TypeError(f"a TCP address is (host: str, port: int), not {address!r}")
        return (address[0], address[1])
    if isinstance(address, str | os.PathLike):
        return os.fspath(address)
    raise TypeError(f"an address is a socket path or (host, port), not {address!r}")


def describe_address(address: Address) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else address


def check_text(name: str, value: object) -> str:
    """Check a page name or record id before it goes on the wire."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{name} is longer than {MAX_TEXT} characters")
    return value


def check_context(context: Mapping[str, str] | None) -> dict[str, str]:
    """Check a session's context (user, company, language...) before ``hello``."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping of str to str, not {type(context).__name__}")
    if len(context) > MAX_CONTEXT:
        raise ValueError(f"context has {len(context)} entries; at most {MAX_CONTEXT}")
    copy = {}
    for key, value in context.items():
        copy[check_text("context key", key)] = check_text(f"context[{key!r}]", value)
    return copy


def refuse_in_child_session() -> None:
    """A child session cannot start background tasks (Business Central refuses it too)."""
    if in_child_session():
        raise NotAllowed(
            "a child session cannot start background tasks: this code runs inside a"
            " pbt-server worker (or a process a codeunit started)"
        )


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
        self._pages: dict[int, PageBase] = {}
        self._tasks: dict[int, TaskBase[Any]] = {}  # accepted, no outcome arrived yet
        self._work: deque[Work] = deque()
        self._orphans: list[int] = []  # accepted tasks whose enqueue call was abandoned
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

    def take_work(self) -> list[Work]:
        """What the dispatcher is to run next, in order (tasks, pages whose count changed)."""
        work = list(self._work)
        self._work.clear()
        return work

    # --- requests ----------------------------------------------------------------------

    def request(
        self,
        op: str,
        fields: dict[str, object],
        signal: Signal,
        task: TaskBase[Any] | None = None,
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
        """The caller stopped waiting for ``pending``. A late answer is ignored, except that a
        task it enqueued is cancelled as soon as its id is known: no task without an owner."""
        task = pending.task
        if pending.rid not in self._pending:
            if task is not None and task._id and not task._done:
                self._orphan(task)  # the reply came first; the caller never saw it
            return
        if task is None:
            del self._pending[pending.rid]
        else:
            pending.orphaned = True

    def take_orphans(self) -> list[bytes]:
        """Cancel requests to send for tasks nobody holds a handle to."""
        frames = []
        for task_id in self._orphans:
            if not self.ended:
                _, frame = self.request("cancel", {"task": task_id}, _NoSignal())
                frames.append(frame)
        self._orphans.clear()
        return frames

    def _orphan(self, task: TaskBase[Any]) -> None:
        task._returned = True
        self._orphans.append(task._id)
        text = f"the call that enqueued task {task._id} was cancelled before it returned"
        self._decide(task, None, BackgroundTaskCanceled(text, code=CancelReason.CANCELED))

    def welcome(self, reply: Message) -> int:
        """Take the hello reply; return the largest frame the broker may send (and accepts)."""
        checked = validate_reply("hello", reply)
        self.session_id = checked["session"]
        self.max_frame = checked["max_frame"]  # what the broker accepts from us
        return int(checked["max_frame"])

    def add_page(self, page: PageBase) -> None:
        if self.ended:
            page._closed = True
        else:
            self._pages[page.id] = page

    def close_page(self, page: PageBase) -> bool:
        """Mark ``page`` closed before close_page is sent; False if it already was."""
        if page._closed:
            return False
        self.check_open()
        page._closed = True  # from now on its outcomes are cancellations
        self._pages.pop(page.id, None)
        self._decide_moved(page, CancelReason.PAGE_CLOSED, f"page {page.name!r} was closed")
        return True

    def set_record(self, page: PageBase, record_id: object) -> dict[str, object]:
        """Change the page's record locally, before the request is sent."""
        record_id = check_text("record_id", record_id)
        self.check_open()
        if page._closed:
            raise ClientClosed(f"page {page.name!r} was closed")
        old = page._record_id
        page._record_id = record_id
        if old != record_id:
            text = f"the page's record changed from {old!r} to {record_id!r}"
            self._decide_moved(page, CancelReason.RECORD_CHANGED, text)
        return {"page": page.id, "record": record_id}

    def enqueue(
        self,
        page: PageBase,
        task: TaskBase[Any],
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
        if not 0 <= codeunit_id <= INT64_MAX:
            raise InvalidParameters(f"codeunit_id {codeunit_id} is out of range")
        if timeout is not None and (type(timeout) is not int or abs(timeout) > INT64_MAX):
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

    def cancel(self, page: PageBase, task_id: object) -> bool | None:
        """Start cancelling a task of ``page``: None if the broker must be asked; else the
        answer (False: unknown, not this page's, or already decided; True: its outcome had
        arrived and is now decided cancelled, so no trigger runs)."""
        if self._closed_by_user:
            raise ClientClosed("this session was closed")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            return False
        task = page._undecided.get(task_id)
        if task is not None:
            self._decide(task, None, BackgroundTaskCanceled(code=CancelReason.CANCELED))
            return True
        task = self._tasks.get(task_id)
        if task is None or task.page is not page:
            return False
        return None

    # --- frames from the broker ----------------------------------------------------------

    def receive(self, message: Message) -> None:
        """Apply one broker frame; what becomes due is in :meth:`take_work`.

        Raises:
            ProtocolError: the frame is malformed.
            ConnectionLost: the broker refused the connection as a whole.
        """
        if self.tap is not None:
            self.tap(message)
        op = message["op"]
        if op == "reply":
            self._answer(message, None)
        elif op in EVENTS.shapes:
            event = EVENTS.validate(message)
            match event["op"]:
                case "error":
                    self._refused(event["rid"], event["code"], event["text"])
                case "completed":
                    self._arrive(event["task"], event["results"], None)
                case "failed":
                    error = BackgroundTaskError(
                        event["text"],
                        code=event["code"],
                        call_stack=event["stack"],
                        task_id=event["task"],
                    )
                    self._arrive(event["task"], None, error)
                case "cancelled":
                    task = self._tasks.pop(event["task"], None)
                    if task is not None:
                        text = event["text"] or f"task {task.id} was cancelled"
                        self._decide(task, None, BackgroundTaskCanceled(text, code=event["code"]))
                case "progress":
                    self._progress(event["task"], event["progress"])
                case "shutdown":
                    self._shutdown_text = event["text"]
                    logger.info("the server is shutting down: %s", self._shutdown_text)
        else:
            logger.debug("ignored unknown event %r", op)

    def _refused(self, rid: int | None, code: str, text: str) -> None:
        if rid is None:
            # Refused before it could answer our hello (e.g. ServerBusy): connect() raises
            # the server's own reason, whether or not our hello was out yet.
            if self.session_id == 0:
                self.refusal = error_from_wire(code, text)
            hello = next((p for p in self._pending.values() if p.op == "hello"), None)
            if hello is None:
                raise ConnectionLost(f"the server refused this connection: {code}: {text}")
            rid = hello.rid
        self._answer({"op": "error", "rid": rid}, error_from_wire(code, text))

    def _answer(self, message: Message, error: PbtError | None) -> None:
        rid = message.get("rid")
        pending = self._pending.get(rid) if type(rid) is int else None
        if pending is None:
            logger.debug("ignored an answer to unknown request %r", rid)
            return
        # Checked before the request leaves _pending: if the reply is malformed, the
        # connection_lost() that follows still wakes its caller.
        if error is not None:
            pending.error = error
        else:
            validate_reply(pending.op, message)
            if pending.task is not None:
                self._accept(pending.task, message, orphaned=pending.orphaned)
            elif pending.op in _CANCELLING_OPS:
                # The broker sends the cancelled events first; this only mops up.
                for task_id in message["cancelled"]:
                    task = self._tasks.pop(task_id, None)
                    if task is not None:
                        error = BackgroundTaskCanceled(code=_CANCELLING_OPS[pending.op])
                        self._decide(task, None, error)
        pending.reply = message
        del self._pending[pending.rid]
        pending.signal.set()

    def _accept(self, task: TaskBase[Any], reply: Message, *, orphaned: bool) -> None:
        # Registered here, on the reading side, because the task's outcome event may be the
        # very next frame: before the caller that asked has even been woken.
        task._id = reply["task"]
        task._timeout = reply["timeout"]
        self._tasks[task._id] = task
        task.page._pending += 1
        self._note_pending(task.page)
        if orphaned:
            self._tasks.pop(task._id)
            self._orphan(task)

    def _progress(self, task_id: int, progress: dict[str, str]) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            logger.debug("ignored progress for task %d: unknown or already ended", task_id)
            return
        page = task.page
        if page.closed or page.record_id != task.record_id:
            return  # the page moved on: the task is as good as cancelled
        task._progress = progress
        task._progress_seq += 1
        _wake(task)
        if page.on_progress is not None and not task._progress_due:
            task._progress_due = True
            self._work.append(ProgressNote(task))

    def _arrive(self, task_id: int, results: dict[str, str] | None, error: PbtError | None) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            logger.debug("ignored an outcome for task %d: unknown or already ended", task_id)
            return
        page = task.page
        # The page moved on before the outcome arrived: a cancel, decided now.
        if page.closed:
            text = f"page {page.name!r} was closed"
            self._decide(task, None, BackgroundTaskCanceled(text, code=CancelReason.PAGE_CLOSED))
            return
        if page.record_id != task.record_id:
            text = f"the page's record changed from {task.record_id!r} to {page.record_id!r}"
            error = BackgroundTaskCanceled(text, code=CancelReason.RECORD_CHANGED)
            self._decide(task, None, error)
            return
        if not _has_trigger(task, error):
            # Nothing would run for it: decided now, as the dispatcher would at once (and
            # without a thread switch to it).
            self._decide(task, results, error)
            return
        task._arrived = (results, error)
        page._undecided[task.id] = task
        self._work.append(task)
        task._signal.set()  # waiters wake and decide for themselves
        _wake(task)

    def decide(self, task: TaskBase[Any]) -> None:
        """Make the one decision about an outcome that arrived (no-op once decided)."""
        if not task._done and task._arrived is not None:
            results, error = task._arrived
            self._decide(task, results, error)

    def _decide_moved(self, page: PageBase, code: CancelReason, text: str) -> None:
        for task in list(page._undecided.values()):
            if code is CancelReason.PAGE_CLOSED or task.record_id != page.record_id:
                self._decide(task, None, BackgroundTaskCanceled(text, code=code))

    def _decide(
        self, task: TaskBase[Any], results: dict[str, str] | None, error: PbtError | None
    ) -> None:
        if task._done:
            return
        if isinstance(error, BackgroundTaskCanceled | BackgroundTaskError):
            error.task_id = task.id
        page = task.page
        page._undecided.pop(task.id, None)
        task._arrived = None
        task._results = results
        task._error = error
        task._done = True
        if task._id:
            page._pending -= 1
            self._note_pending(page)
        task._signal.set()
        _wake(task)

    def _note_pending(self, page: PageBase) -> None:
        if page.on_pending_changed is not None and page not in self._work:
            self._work.append(page)

    # --- the end -------------------------------------------------------------------------

    def connection_lost(self, reason: str | None = None) -> None:
        """Fail every pending request and every task without an outcome, ConnectionLost.

        ``reason`` says what broke (``None``: a clean end of stream); after a ``shutdown``
        event the broker's own text is the reason, whatever the socket said. Outcomes that
        had arrived but were not yet decided end with it too: no trigger runs any more.
        """
        if self.ended:
            return
        if self._shutdown_text is not None:
            reason = f"the server shut down: {self._shutdown_text}"
        elif reason is None:
            reason = "the server closed the connection"
        self._lost = reason
        for page in self._pages.values():  # the session is over: no trigger runs any more
            for task in list(page._undecided.values()):
                self._decide(task, None, ConnectionLost(reason))
        self._end(lambda: ConnectionLost(reason), lambda task: ConnectionLost(reason))

    def close(self) -> None:
        """The user closed the session: pending requests fail, tasks end cancelled."""
        ended = self.ended
        self._closed_by_user = True
        if ended:
            return
        for page in self._pages.values():
            text = "the session was closed"
            for task in list(page._undecided.values()):
                error = BackgroundTaskCanceled(text, code=CancelReason.SESSION_CLOSED)
                self._decide(task, None, error)
        self._end(
            lambda: ClientClosed("the session was closed"),
            lambda task: BackgroundTaskCanceled(
                f"the session was closed before task {task.id} ended",
                code=CancelReason.SESSION_CLOSED,
            ),
        )

    def _end(
        self,
        request_error: Callable[[], PbtError],
        task_error: Callable[[TaskBase[Any]], PbtError],
    ) -> None:
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.error = request_error()
            request.signal.set()
        tasks, self._tasks = self._tasks, {}
        for task in tasks.values():
            self._decide(task, None, task_error(task))
        for page in self._pages.values():
            page._closed = True
        self._pages.clear()

    # --- triggers ------------------------------------------------------------------------

    def dispatch(self, work: Work) -> Generator[Call, object, None]:
        """Decide ``work`` and run what follows, step by step: a task's trigger and its
        error-level handling, or a page's ``on_pending_changed``.

        Yields ``(callback, args)``; the driver calls it and sends back its return value, or
        throws in the exception it raised. Exceptions from triggers become ERROR
        notifications; an exception from ``on_notification`` is logged and swallowed.
        """
        if isinstance(work, PageBase):
            yield from self._pending_changed(work)
            return
        if isinstance(work, ProgressNote):
            yield from self._progressed(work.task)
            return
        task = work
        self.decide(task)
        error = task._error
        if isinstance(error, BackgroundTaskCanceled | ConnectionLost):
            logger.debug("task %d: %s; no trigger", task.id, error.code)
            return
        page = task.page
        note: Notification | None = None
        try:
            if error is None:
                if page.on_completed is not None:
                    yield page.on_completed, (task.id, task._results)
            else:
                assert isinstance(error, BackgroundTaskError), error
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
        except BaseException as exc:  # a trigger raised: always severity ERROR
            # BaseException too: a trigger's SystemExit must not end the dispatcher, or no
            # later trigger would ever run.
            stack = "".join(traceback.format_exception(exc))
            note = self._notification(task, ErrorLevel.ERROR, type(exc).__name__, str(exc), stack)
        if note is not None:
            yield from self._notify(note)

    def _progressed(self, task: TaskBase[Any]) -> Generator[Call, object, None]:
        # Without the session's lock (the blocking flavour): the flag is cleared before the
        # value is read, so an update that arrives meanwhile queues a note of its own, and
        # one already shown is not shown twice.
        task._progress_due = False
        seq, progress = task._progress_seq, task._progress
        callback = task.page.on_progress
        if callback is None or progress is None or seq == task._progress_told:
            return
        if not is_current(task):
            return
        task._progress_told = seq
        try:
            yield callback, (task.id, dict(progress))
        except GeneratorExit:
            raise
        except BaseException as exc:
            stack = "".join(traceback.format_exception(exc))
            note = self._notification(task, ErrorLevel.ERROR, type(exc).__name__, str(exc), stack)
            yield from self._notify(note)

    def _pending_changed(self, page: PageBase) -> Generator[Call, object, None]:
        callback = page.on_pending_changed
        count = page._pending
        if callback is None or count == page._pending_told:
            return
        page._pending_told = count
        try:
            yield callback, (count,)
        except GeneratorExit:
            raise
        except BaseException as exc:
            stack = "".join(traceback.format_exception(exc))
            note = Notification(
                ErrorLevel.ERROR,
                self.session_id,
                page.id,
                page.name,
                0,
                type(exc).__name__,
                str(exc),
                stack,
            )
            yield from self._notify(note)

    def _notify(self, note: Notification) -> Generator[Call, object, None]:
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
        self, task: TaskBase[Any], severity: ErrorLevel, code: str, text: str, stack: str
    ) -> Notification:
        page = task.page
        return Notification(
            severity, self.session_id, page.id, page.name, task.id, code, text, stack
        )


_LEVELS: Final = frozenset(ErrorLevel)


class _NoSignal:
    def set(self) -> None:
        pass


def _wake(task: TaskBase[Any]) -> None:
    for watcher in task._watchers or ():
        watcher.set()


def is_current(task: TaskBase[Any]) -> bool:
    """Whether progress for ``task`` still counts: no outcome arrived, its page still on
    the record it was enqueued under."""
    page = task.page
    return (
        not task._done
        and task._arrived is None
        and not page.closed
        and page.record_id == task.record_id
    )


def work_task(work: Work) -> TaskBase[Any] | None:
    """The task ``work`` is about (None for a page's pending count)."""
    if isinstance(work, ProgressNote):
        return work.task
    return None if isinstance(work, PageBase) else work


def is_due(work: Work) -> bool:
    """A task's trigger (and its progress) may run once the call that returned its TaskId
    has returned."""
    task = work_task(work)
    return task is None or task._returned or task._done


def _has_trigger(task: TaskBase[Any], error: PbtError | None) -> bool:
    """Whether an outcome (``error`` None: completed) has a trigger or a notification to
    run, as its page is set up now."""
    page = task.page
    if error is None:
        return page.on_completed is not None
    if isinstance(error, BackgroundTaskError):
        return page.on_error is not None or task.error_level is not ErrorLevel.IGNORE
    return False  # cancelled or lost: never a trigger


def needs_dispatch(work: Work) -> bool:
    """Whether the dispatcher has anything to do for ``work``: a page's count to tell, an
    undecided outcome to decide, or a decided one's trigger or notification. A task decided
    before it was dispatched (its caller took it) with nothing to run is done with: the
    dispatcher would only find that out, after a thread switch."""
    if isinstance(work, PageBase | ProgressNote) or not work._done:
        return True
    return _has_trigger(work, work._error)


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
