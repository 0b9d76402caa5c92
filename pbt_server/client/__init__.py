"""The blocking client library; ``pbt_server.client.aio`` is the asyncio flavour.

::

    from pbt_server.client import connect, ErrorLevel

    with connect("var/pbt.sock") as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")
        page.on_completed = lambda task_id, results: print(results)
        task = page.enqueue_background_task(50100, {"Wait": "1000"}, error_level=ErrorLevel.WARNING)
        print(task.result(timeout=5))

A caller waiting for a reply or a result reads the socket itself when no other thread is
reading (leader/follower, ``_line.py``): an answer costs no thread switch. When nobody waits,
the session's reader thread, ``pbt-client-reader``, reads instead, so outcomes arrive and
triggers run whatever the application does, and it pings the broker when the line is quiet
(a broker that stopped answering fails the pending handles with ``ConnectionLost``).
Triggers and notifications run one at a time, in completion order, on the session's
dispatcher: a thread of its own (``dispatch="thread"``, ``pbt-client-dispatch``), or the
application's own thread, only when it calls :meth:`Session.process_events`
(``dispatch="manual"``: triggers run only while the application is idle, as Business Central
runs them; ``events_fd()`` lets a GUI's loop wait).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pbt_server.client._core import (
    DEFAULT_KEEPALIVE,
    Address,
    AddressArg,
    Core,
    Notification,
    PageBase,
    PendingRequest,
    SessionBase,
    TaskBase,
    Work,
    check_context,
    check_text,
    describe_address,
    is_current,
    is_due,
    needs_dispatch,
    refuse_in_child_session,
    resolve_addresses,
    run_dispatch,
    status_fields,
    work_task,
)
from pbt_server.client._line import Line, Signal, Waiter, waiter
from pbt_server.errors import (
    AuthenticationFailed,
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ClientClosed,
    ConnectionLost,
    EnqueueError,
    InvalidParameters,
    MemoryBudgetExceeded,
    NotAllowed,
    PageClosed,
    PbtError,
    QueueFull,
    ServerBusy,
    ServerShuttingDown,
    UnknownCodeunit,
)
from pbt_server.protocol import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, ErrorLevel, FrameDecoder

__all__ = [
    "AuthenticationFailed",
    "BackgroundTask",
    "BackgroundTaskCanceled",
    "BackgroundTaskError",
    "ClientClosed",
    "ConnectionLost",
    "EnqueueError",
    "ErrorLevel",
    "InvalidParameters",
    "MemoryBudgetExceeded",
    "NotAllowed",
    "Notification",
    "Page",
    "PageClosed",
    "PbtError",
    "QueueFull",
    "ServerBusy",
    "ServerShuttingDown",
    "Session",
    "UnknownCodeunit",
    "connect",
]

Dispatch = Literal["thread", "manual"]


def connect(
    address: AddressArg | Sequence[AddressArg] | None = None,
    *,
    token: str = "",
    timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
    context: Mapping[str, str] | None = None,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    dispatch: Dispatch = "thread",
    config: str | os.PathLike[str] | None = None,
    operator: bool = False,
) -> Session:
    """Connect to a pbt-server broker and open a session.

    Args:
        address: a Unix socket path, a ``(host, port)`` pair for TCP, or a list of them
            tried in order (the first that answers wins). ``None`` uses ``config`` if
            given, else ``$PBT_SOCKET``, else ``var/pbt.sock``.
        token: the server's ``AuthToken`` (required on TCP, ignored on the Unix socket).
        timeout: seconds to wait for the connection and the broker's hello reply.
        max_frame: the largest frame accepted from the broker, in bytes.
        context: the session's context (user id, company, language...), ``str`` to
            ``str``; every task of the session sees it as ``ctx.context``.
        keepalive: seconds of silence on the line before the client pings the broker; a
            broker that does not answer within as long again is taken for lost
            (``ConnectionLost``). ``None`` or 0: never.
        dispatch: ``"thread"`` runs triggers on a dispatcher thread of the session;
            ``"manual"`` runs them only inside :meth:`Session.process_events`.
        config: a ``server.ini`` to find the server by, as the server does (its
            ``PBT_*`` overrides apply): its socket, or its TCP address and token.
        operator: an operator's connection, for ``status`` and ``ping`` only; it does not
            count against ``MaxConnections``, so it works when the server is full.

    Returns:
        The open session; use it as a context manager to close it.

    Raises:
        ConnectionLost: the broker could not be reached or did not answer in time.
        NotAllowed: called inside a child session (a codeunit cannot start tasks).
        PbtError: the broker refused the hello (e.g. ``AuthenticationFailed``).
    """
    refuse_in_child_session()
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if dispatch not in ("thread", "manual"):
        raise ValueError(f"dispatch must be 'thread' or 'manual', not {dispatch!r}")
    fields = _hello_fields(token, context, operator)
    if address is None and config is not None:
        address, fields["token"] = _from_config(config, token)
    errors: list[str] = []
    for resolved in resolve_addresses(address):
        try:
            sock = _open_socket(resolved, timeout)
        except ConnectionLost as err:
            errors.append(err.text)
            continue
        session = Session(sock, resolved, max_frame, keepalive, dispatch)
        try:
            session._hello(fields, timeout)
        except BaseException:
            session.close()
            raise
        return session
    raise ConnectionLost("; ".join(errors))


def _hello_fields(
    token: str, context: Mapping[str, str] | None, operator: bool
) -> dict[str, object]:
    fields: dict[str, object] = {"protocol": PROTOCOL_VERSION, "token": token}
    if context:
        fields["context"] = check_context(context)
    if operator:
        fields["operator"] = True
    return fields


def _from_config(path: str | os.PathLike[str], token: str) -> tuple[list[AddressArg], str]:
    """Where the server of ``path`` listens: its Unix socket first, then its TCP address."""
    from pbt_server.config import load_config  # lazy: only this way of connecting needs it

    server = load_config(Path(path)).server
    addresses: list[AddressArg] = [str(server.socket_path)]
    if server.tcp_address is not None:
        host, port = server.tcp_address
        addresses.append(("127.0.0.1" if host in ("0.0.0.0", "") else host, port))
    return addresses, token or server.auth_token


def _open_socket(address: Address, timeout: float) -> socket.socket:
    try:
        if isinstance(address, tuple):
            sock = socket.create_connection(address, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if isinstance(address, tuple):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock.settimeout(timeout)
                sock.connect(address)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
    except OSError as err:
        raise ConnectionLost(f"cannot connect to {describe_address(address)}: {err}") from err
    return sock


# --- dispatchers: where triggers run ------------------------------------------------------


class _ThreadDispatcher:
    """Triggers on a thread of the session's own, one at a time, in order."""

    def __init__(self, core: Core, lock: threading.Lock) -> None:
        self._core = core
        self._lock = lock
        self._queue: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._blocked: tuple[TaskBase[Any], Waiter] | None = None  # waits for its TaskId
        self.thread = threading.Thread(target=self._run, name="pbt-client-dispatch", daemon=True)
        self.thread.start()

    def put(self, work: list[Work]) -> None:
        for item in work:
            if needs_dispatch(item):
                self._queue.put(item)

    def returned(self, task: TaskBase[Any]) -> None:
        """(session lock held) The call that enqueued ``task`` returns: its trigger may run."""
        task._returned = True
        if self._blocked is not None and self._blocked[0] is task:
            self._blocked[1].wake()

    def ended(self) -> None:
        """(session lock held) Every task was decided: none waits for its TaskId any more."""
        if self._blocked is not None:
            self._blocked[1].wake()

    def stop(self) -> None:
        self._queue.put(None)  # after any queued work: it is decided cancelled or lost

    def join(self) -> None:
        if threading.current_thread() is not self.thread:  # close() from a trigger
            self.thread.join()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            if not is_due(work):
                task = work_task(work)
                assert task is not None
                self._wait_returned(task)  # the caller has its TaskId before the trigger
            self.put(_decided(self._core, self._lock, work))
            run_dispatch(self._core.dispatch(work))

    def _wait_returned(self, task: TaskBase[Any]) -> None:
        me = waiter()
        try:
            while True:
                with self._lock:
                    me.rearm()
                    if is_due(task):
                        return
                    self._blocked = (task, me)
                me.sleep(None)
        finally:
            with self._lock:
                self._blocked = None
                me.rearm()


def _decided(core: Core, lock: threading.Lock, work: Work) -> list[Work]:
    """Decide ``work`` under the session's lock (its trigger then runs without the lock);
    return what the decision made due (a page's pending count)."""
    with lock:
        if isinstance(work, TaskBase):
            core.decide(work)
        return core.take_work()


class _ManualDispatcher:
    """Triggers only when the application calls ``process_events``, on its own thread."""

    def __init__(self, core: Core, lock: threading.Lock) -> None:
        self._core = core
        self._lock = lock
        self._due: deque[Work] = deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopped = False

    def put(self, work: list[Work]) -> None:
        work = [item for item in work if needs_dispatch(item)]
        if work:
            self._due.extend(work)
            os.eventfd_write(self._fd, 1)

    def returned(self, task: TaskBase[Any]) -> None:
        task._returned = True

    def ended(self) -> None:
        pass

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._fd, 1)

    def join(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def fileno(self) -> int:
        return self._fd

    def process(self, timeout: float) -> int:
        if not self._due and timeout > 0 and not self._stopped:
            select.select([self._fd], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            os.eventfd_read(self._fd)
        ran = 0
        while self._due:
            work = self._due[0]
            if not is_due(work):  # enqueued on another thread, which has not returned yet
                os.eventfd_write(self._fd, 1)
                break
            self._due.popleft()
            self._due.extend(
                item for item in _decided(self._core, self._lock, work) if needs_dispatch(item)
            )
            run_dispatch(self._core.dispatch(work))
            ran += 1
        return ran


_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for session in list(_sessions):
        session._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class Session(SessionBase):
    """One connection to the broker (a *parent session*). Create it with :func:`connect`."""

    def __init__(
        self,
        sock: socket.socket,
        address: Address,
        max_frame: int,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        dispatch: Dispatch = "thread",
    ) -> None:
        super().__init__(Core(max_frame=max_frame), address)
        self._sock = sock
        self._decoder = FrameDecoder(max_frame, trusted=True)
        self._lock = threading.Lock()  # guards the core and the line (reader vs callers)
        self._forked = False
        self._dispatcher: _ThreadDispatcher | _ManualDispatcher = (
            _ThreadDispatcher(self._core, self._lock)
            if dispatch == "thread"
            else _ManualDispatcher(self._core, self._lock)
        )
        self._line = Line(
            sock,
            describe_address(address),
            self._core,
            self._lock,
            self._decoder,
            keepalive or None,
            self._dispatcher.put,
            self._dispatcher.stop,
        )
        self._reader = self._line.reader
        self._line.start()
        _sessions.add(self)

    def open_page(self, name: str, record_id: str = "") -> Page:
        """Open a page in this session.

        Args:
            name: the page name (at most ``MAX_TEXT`` characters).
            record_id: the page's current record id; tasks are enqueued under it.

        Returns:
            The open page.

        Raises:
            TypeError: name or record_id is not a str.
            ValueError: name or record_id is too long.
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        name = check_text("name", name)
        record_id = check_text("record_id", record_id)
        reply = self._request("open_page", {"name": name, "record": record_id})
        page = Page(self, reply["page"], name, record_id)
        with self._lock:
            self._core.add_page(page)
        return page

    def ping(self) -> None:
        """Round-trip to the broker.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        self._request("ping", {})

    def status(self) -> dict[str, object]:
        """The broker's status: ``server``, ``sessions`` and ``workers``.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        return status_fields(self._request("status", {}))

    def process_events(self, timeout: float = 0.0) -> int:
        """Run the triggers and notifications that are due, on this thread; return how many.

        Only for ``connect(..., dispatch="manual")``. Waits up to ``timeout`` seconds for
        something to become due when nothing is.

        Raises:
            ClientClosed: the session was connected with ``dispatch="thread"``.
        """
        dispatcher = self._dispatcher
        if not isinstance(dispatcher, _ManualDispatcher):
            raise ClientClosed("process_events needs connect(..., dispatch='manual')")
        return dispatcher.process(timeout)

    def events_fd(self) -> int:
        """A file descriptor that becomes readable when something is due: wait on it in a
        GUI's or a selector's loop, then call :meth:`process_events`.

        Raises:
            ClientClosed: the session was connected with ``dispatch="thread"``.
        """
        dispatcher = self._dispatcher
        if not isinstance(dispatcher, _ManualDispatcher):
            raise ClientClosed("events_fd needs connect(..., dispatch='manual')")
        return dispatcher.fileno()

    def wait_closed(self, timeout: float | None = None) -> PbtError | None:
        """Wait until the session has ended; return why (``ClientClosed`` if you closed it,
        ``ConnectionLost`` with the reason if the broker went away), or None after
        ``timeout`` seconds."""
        self._reader.join(timeout)
        return None if self._reader.is_alive() else self._core.ended_error()

    def close(self) -> None:
        """Close the session; the broker cancels its tasks. Idempotent.

        Unresolved handles end with ``BackgroundTaskCanceled`` (code ``SessionClosed``);
        queued triggers do not run. Safe to call from a trigger.
        """
        if self._forked:
            return  # the connection is the parent process's; leave it alone
        with self._lock:
            self._core.close()
            work = self._core.take_work()
            self._dispatcher.ended()
        self._dispatcher.put(work)
        self._line.shutdown()  # whoever reads sees the end; the reader thread closes
        if threading.current_thread() is not self._reader:
            self._reader.join()
        self._dispatcher.join()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals shared with Page -------------------------------------------------------

    def _hello(self, fields: dict[str, object], timeout: float) -> None:
        try:
            reply = self._request("hello", fields, timeout=timeout)
        except TimeoutError as err:
            where = describe_address(self._address)
            raise ConnectionLost(f"{where}: no answer to hello within {timeout} s") from err
        except ConnectionLost as err:
            if self._core.refusal is not None:
                raise self._core.refusal from err
            raise
        with self._lock:
            announced = self._core.welcome(reply)
            # A result may be as large as the broker's MaxFrameBytes, whatever we assumed.
            self._decoder.max_frame = max(self._decoder.max_frame, announced)

    def _check_process(self) -> None:
        if self._forked:
            raise ClientClosed(
                "this session belongs to the process that connected it; a forked child"
                " must connect a session of its own"
            )

    def _request(
        self,
        op: str,
        fields: dict[str, object],
        task: TaskBase[Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        self._check_process()
        signal = Signal()
        me = waiter()
        line = self._line
        with self._lock:
            pending, frame = self._core.request(op, fields, signal, task)
            line.enlist(me, signal)  # leading already, if nobody reads: no switch for the answer
        try:
            line.send(frame, me)
        except BaseException as err:
            with self._lock:
                line.withdraw(me, signal)
            if isinstance(err, OSError):
                line.end(f"sending to {describe_address(self._address)}: {err}")
                with self._lock:
                    error = self._core.ended_error()
                raise error from err
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            answered = line.wait(me, signal, deadline)
        except BaseException:
            # Interrupted (Ctrl-C, an exception from a signal handler): nobody will take the
            # answer, and a task it enqueued must not live on without an owner.
            self._abandon(pending)
            raise
        if not answered:
            self._abandon(pending)
            raise TimeoutError(f"no answer to {op} within {timeout} s")
        return pending.result()

    def _abandon(self, pending: PendingRequest) -> None:
        with self._lock:
            self._core.abandon(pending)
            orphans = self._core.take_orphans()
            work = self._core.take_work()
        self._dispatcher.put(work)
        for frame in orphans:
            self._line.send_quietly(frame)


class Page(PageBase):
    """A page opened in a session (:meth:`Session.open_page`).

    Set ``on_completed(task_id, results)``, ``on_error(task_id, code, text, call_stack)
    -> is_handled``, ``on_pending_changed(count)`` and ``on_progress(task_id, progress)`` to
    follow its tasks; they run on the session's dispatcher.
    """

    _session: Session

    @property
    def session(self) -> Session:
        """The session this page belongs to."""
        return self._session

    def enqueue_background_task(
        self,
        codeunit_id: int,
        parameters: dict[str, str] | None = None,
        timeout: int | None = None,
        error_level: ErrorLevel | str = ErrorLevel.ERROR,
    ) -> BackgroundTask:
        """Enqueue a codeunit run under the page's current record.

        Args:
            codeunit_id: the registered codeunit id.
            parameters: text keys and text values; copied now.
            timeout: milliseconds; ``None`` or <= 0 takes the server default, larger than
                the server maximum is clamped to it.
            error_level: how an unhandled failure is surfaced.

        Returns:
            The task handle. Its triggers run only after this call has returned.

        Raises:
            InvalidParameters: a bad argument (checked before anything is sent).
            PageClosed: the page was closed.
            QueueFull: the session already has the maximum number of tasks waiting.
            UnknownCodeunit: no codeunit has that id.
            MemoryBudgetExceeded: the server's memory budget is spent.
            ServerShuttingDown: the server is stopping.
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        task = BackgroundTask(self)
        with session._lock:
            fields = session._core.enqueue(
                self, task, codeunit_id, parameters, timeout, error_level
            )
        try:
            session._request("enqueue", fields, task)
        finally:
            # Also when the call fails or is interrupted: the dispatcher must not wait for
            # a TaskId that will never be returned (the task is cancelled, or was refused).
            with session._lock:
                session._dispatcher.returned(task)
        return task

    def try_enqueue_background_task(
        self,
        codeunit_id: int,
        parameters: dict[str, str] | None = None,
        timeout: int | None = None,
        error_level: ErrorLevel | str = ErrorLevel.ERROR,
    ) -> BackgroundTask | None:
        """Business Central's ``Ok := CurrPage.EnqueueBackgroundTask(...)``: the same as
        :meth:`enqueue_background_task`, but a refusal returns None instead of raising; the
        reason is then :attr:`last_enqueue_error` (with its ``.code``).

        Raises:
            ClientClosed: the session was closed (a misuse, not a refusal).
            ConnectionLost: the connection broke.
        """
        try:
            task = self.enqueue_background_task(codeunit_id, parameters, timeout, error_level)
        except (EnqueueError, ServerBusy) as err:
            self.last_enqueue_error = err
            return None
        self.last_enqueue_error = None
        return task

    def cancel_background_task(self, task_id: int) -> bool:
        """Cancel a waiting or running task of this page; no trigger runs for it.

        Args:
            task_id: the task's id.

        Returns:
            True if the task was cancelled (its handle then raises BackgroundTaskCanceled);
            False for unknown or finished ids.

        Raises:
            ClientClosed: the session was closed.
        """
        session = self._session
        with session._lock:
            local = session._core.cancel(self, task_id)
            work = session._core.take_work()
        session._dispatcher.put(work)
        if local is not None:
            return local
        try:
            reply = session._request("cancel", {"task": task_id})
        except ConnectionLost:
            return False  # the task has ended with ConnectionLost already
        return reply.get("cancelled") is True

    def set_record(self, record_id: str) -> None:
        """Move the page to another record; its tasks enqueued under the old one are cancelled.

        Raises:
            TypeError: record_id is not a str.
            ValueError: record_id is too long.
            ClientClosed: the page or session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        with session._lock:
            fields = session._core.set_record(self, record_id)
            work = session._core.take_work()
        session._dispatcher.put(work)
        session._request("set_record", fields)

    def close(self) -> None:
        """Close the page; its tasks are cancelled. Idempotent.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        with session._lock:
            closing = session._core.close_page(self)
            work = session._core.take_work()
        session._dispatcher.put(work)
        if closing:
            session._request("close_page", {"page": self.id})


class BackgroundTask(TaskBase[Page]):
    """The handle of an enqueued task: a future resolved exactly once."""

    _signal: Signal

    def __init__(self, page: Page) -> None:
        super().__init__(page, Signal())

    def done(self) -> bool:
        """Return True once the task has its outcome (results, error or cancellation).

        Only :meth:`result` and :meth:`exception` take the outcome, and so decide it: an
        outcome nobody took yet becomes a cancellation if the page moves on first.
        """
        return self._done or self._arrived is not None

    def result(self, timeout: float | None = None) -> dict[str, str]:
        """Wait for the task's outcome.

        Args:
            timeout: seconds to wait; ``None`` waits until the outcome arrives.

        Returns:
            The results the codeunit returned.

        Raises:
            BackgroundTaskError: the task failed (``.code``, ``.text``, ``.call_stack``).
            BackgroundTaskCanceled: the task was cancelled (``.code`` says why).
            ConnectionLost: the connection broke before the outcome arrived.
            TimeoutError: no outcome within ``timeout``.
        """
        self._wait(timeout)
        return self._outcome()

    def exception(self, timeout: float | None = None) -> PbtError | None:
        """Wait for the outcome; return the error :meth:`result` would raise, or None.

        Raises:
            TimeoutError: no outcome within ``timeout``.
        """
        self._wait(timeout)
        return self._error

    def cancel(self) -> bool:
        """Same as ``task.page.cancel_background_task(task.id)``."""
        return self.page.cancel_background_task(self.id)

    def progress_updates(self, timeout: float | None = None) -> Iterator[dict[str, str]]:
        """The task's progress as it changes, until its outcome arrives::

            for progress in task.progress_updates(timeout=60):
                print(progress["done"], "of", progress["of"])
            results = task.result()

        Yields the latest value first if there is one; a consumer slower than the updates
        gets the latest each time, not every one. Ends (without raising) when the outcome
        arrives, whatever it is, or when the page moves on; :meth:`result` tells which.

        Raises:
            TimeoutError: the outcome has not arrived within ``timeout`` seconds (None:
                no limit) of the call.
        """
        session = self.page.session
        session._check_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = session._lock
        signal = Signal()
        me = waiter()
        seen = 0
        with lock:
            if self._watchers is None:
                self._watchers = []
            self._watchers.append(signal)
        try:
            while True:
                with lock:
                    if not is_current(self):
                        return
                    value = None
                    if self._progress_seq != seen and self._progress is not None:
                        seen, value = self._progress_seq, dict(self._progress)
                    else:
                        signal.is_set = False
                        session._line.enlist(me, signal)
                if value is not None:
                    yield value
                elif not session._line.wait(me, signal, deadline):
                    raise TimeoutError(f"task {self.id} has no outcome after {timeout} s")
        finally:
            with lock:
                self._watchers.remove(signal)

    def _wait(self, timeout: float | None) -> None:
        if not self._done and not self._signal.is_set:
            session = self.page.session
            session._check_process()  # a forked child must not read its parent's socket
            deadline = None if timeout is None else time.monotonic() + timeout
            me = waiter()
            with session._lock:
                session._line.enlist(me, self._signal)
            if not session._line.wait(me, self._signal, deadline, self):
                raise TimeoutError(f"task {self.id} has no outcome after {timeout} s")
        self._decide()

    def _decide(self) -> None:
        if not self._done and self._arrived is not None:
            session = self.page.session
            with session._lock:
                session._core.decide(self)
                work = session._core.take_work()
            session._dispatcher.put(work)
