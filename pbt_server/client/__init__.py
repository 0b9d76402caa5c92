"""The blocking client library (SPEC §6); ``pbt_server.client.aio`` is the asyncio flavour.

::

    from pbt_server.client import connect, ErrorLevel

    with connect("var/pbt.sock") as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")
        page.on_completed = lambda task_id, results: print(results)
        task = page.enqueue_background_task(50100, {"Wait": "1000"}, error_level=ErrorLevel.WARNING)
        print(task.result(timeout=5))

Two daemon threads per session: ``pbt-client-reader`` reads the socket and resolves replies
and task handles; ``pbt-client-dispatch`` runs the triggers and notifications one at a time,
in completion order. A handle is resolved before its trigger is queued, so ``result()``
never waits on the dispatcher: a trigger may wait for another task without deadlock.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from types import TracebackType
from typing import Any, Final

from pbt_server.client._core import (
    Address,
    Core,
    ErrorLevel,
    Notification,
    PageState,
    SessionBase,
    TaskState,
    check_text,
    describe_address,
    field,
    resolve_address,
    run_dispatch,
    status_fields,
)
from pbt_server.errors import (
    AuthenticationFailed,
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ClientClosed,
    ConnectionLost,
    InvalidParameters,
    PageClosed,
    PbtError,
    ProtocolError,
    QueueFull,
    ServerShuttingDown,
    UnknownCodeunit,
)
from pbt_server.protocol import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, FrameDecoder, Message

__all__ = [
    "AuthenticationFailed",
    "BackgroundTask",
    "BackgroundTaskCanceled",
    "BackgroundTaskError",
    "ClientClosed",
    "ConnectionLost",
    "ErrorLevel",
    "InvalidParameters",
    "Notification",
    "Page",
    "PageClosed",
    "PbtError",
    "QueueFull",
    "ServerShuttingDown",
    "Session",
    "UnknownCodeunit",
    "connect",
]

_RECV_SIZE: Final = 64 * 1024  # under malloc's mmap threshold: no mmap per recv


class _Latch:
    """A one-shot event on a bare lock: cheaper than ``threading.Event`` on the hot path."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            acquired = self._lock.acquire()
        else:
            acquired = self._lock.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))
        if acquired:
            self._lock.release()  # let every other waiter through too
        return acquired


def connect(
    address: str | os.PathLike[str] | tuple[str, int] | None = None,
    *,
    token: str = "",
    timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Session:
    """Connect to a pbt-server broker and open a session.

    Args:
        address: a Unix socket path, or a ``(host, port)`` pair for TCP. ``None`` uses
            ``$PBT_SOCKET``, else ``var/pbt.sock``.
        token: the server's ``AuthToken`` (required on TCP, ignored on the Unix socket).
        timeout: seconds to wait for the connection and the broker's hello reply.
        max_frame: the largest frame accepted from the broker, in bytes.

    Returns:
        The open session; use it as a context manager to close it.

    Raises:
        ConnectionLost: the broker could not be reached or did not answer in time.
        PbtError: the broker refused the hello (e.g. ``AuthenticationFailed``).
    """
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    resolved = resolve_address(address)
    session = Session(_open_socket(resolved, timeout), resolved, max_frame)
    try:
        session._hello(token, timeout)
    except BaseException:
        session.close()
        raise
    return session


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


class Session(SessionBase):
    """One connection to the broker (a *parent session*). Create it with :func:`connect`."""

    def __init__(self, sock: socket.socket, address: Address, max_frame: int) -> None:
        super().__init__(Core(max_frame=max_frame), address)
        self._sock = sock
        self._decoder = FrameDecoder(max_frame, trusted=True)
        self._lock = threading.Lock()  # guards the core (reader thread vs callers)
        self._send_lock = threading.Lock()  # one whole frame at a time on the socket
        self._work: queue.SimpleQueue[TaskState[Any] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="pbt-client-reader", daemon=True)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="pbt-client-dispatch", daemon=True
        )
        self._reader.start()
        self._dispatcher.start()

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
        page = Page(self, field(reply, "page", int), name, record_id)
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
        """The broker's status: ``sessions`` and ``workers``, each a list of maps.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        return status_fields(self._request("status", {}))

    def close(self) -> None:
        """Close the session; the broker cancels its tasks. Idempotent.

        Unresolved handles end with ``BackgroundTaskCanceled`` (code ``SessionClosed``);
        queued triggers do not run. Safe to call from a trigger.
        """
        with self._lock:
            self._core.close()
        self._shutdown()  # wakes the reader
        current = threading.current_thread()
        if current is not self._reader:
            self._reader.join()
        if current is not self._dispatcher:  # close() from a trigger must not join itself
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

    def _hello(self, token: str, timeout: float) -> None:
        hello = {"protocol": PROTOCOL_VERSION, "token": token}
        try:
            reply = self._request("hello", hello, timeout=timeout)
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

    def _request(
        self,
        op: str,
        fields: dict[str, object],
        task: TaskState[Any] | None = None,
        timeout: float | None = None,
    ) -> Message:
        latch = _Latch()
        with self._lock:
            pending, frame = self._core.request(op, fields, latch, task)
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as err:
            with self._lock:
                self._core.connection_lost(f"sending to {describe_address(self._address)}: {err}")
                error = self._core.ended_error()
            self._shutdown()
            raise error from err
        if not latch.wait(timeout):
            with self._lock:
                self._core.abandon(pending)
            raise TimeoutError(f"no answer to {op} within {timeout} s")
        return pending.result()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):  # already closed by the reader
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read(self) -> None:
        sock, decoder, core, lock = self._sock, self._decoder, self._core, self._lock
        reason: str | None = "the client's reader stopped"
        try:
            while True:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    reason = None  # a clean end of stream
                    break
                for message in decoder.feed(data):
                    with lock:
                        task = core.receive(message)
                    if task is not None:
                        self._work.put(task)
        except ConnectionLost as err:
            reason = err.text
        except ProtocolError as err:
            reason = f"bad frame from the server: {err.text}"
        except OSError as err:
            reason = f"connection to {describe_address(self._address)} broke: {err}"
        finally:
            with lock:
                core.connection_lost(reason)  # no-op after close()
            self._shutdown()  # fails a sendall blocked on a peer that stopped reading
            with self._send_lock:
                sock.close()
            self._work.put(None)  # after any queued work: the dispatcher skips it (pages closed)

    def _dispatch(self) -> None:
        while (task := self._work.get()) is not None:
            run_dispatch(self._core.dispatch(task))


class Page(PageState):
    """A page opened in a session (:meth:`Session.open_page`).

    Set ``on_completed(task_id, results)`` and ``on_error(task_id, code, text, call_stack)
    -> is_handled`` to receive task outcomes; both run on the session's dispatcher thread.
    """

    def __init__(self, session: Session, page_id: int, name: str, record_id: str) -> None:
        super().__init__(page_id, name, record_id)
        self._session = session

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
            The task handle.

        Raises:
            InvalidParameters: a bad argument (checked before anything is sent).
            PageClosed: the page was closed.
            QueueFull: the session already has the maximum number of tasks waiting.
            UnknownCodeunit: no codeunit has that id.
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
        session._request("enqueue", fields, task)
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
            if not session._core.should_cancel(self, task_id):
                return False
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
        session._request("set_record", fields)

    def close(self) -> None:
        """Close the page; its tasks are cancelled. Idempotent.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        with session._lock:
            if not session._core.close_page(self):
                return
        session._request("close_page", {"page": self.id})


class BackgroundTask(TaskState[Page]):
    """The handle of an enqueued task: a future resolved exactly once."""

    def __init__(self, page: Page) -> None:
        self._latch = _Latch()
        super().__init__(page, self._latch)

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

    def _wait(self, timeout: float | None) -> None:
        if not self._done and not self._latch.wait(timeout):
            raise TimeoutError(f"task {self.id} has no outcome after {timeout} s")
