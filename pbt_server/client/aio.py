"""The asyncio client library: the names of :mod:`pbt_server.client`, awaitable.

::

    from pbt_server.client.aio import connect

    async with await connect("var/pbt.sock") as session:
        page = await session.open_page("Customer Card", record_id="Customer: 10000")
        page.on_completed = show_results          # a plain function or an ``async def``
        task = await page.enqueue_background_task(50100, {"Wait": "1000"})
        print(await task.result(timeout=5))

The transport's protocol callbacks feed the shared core and resolve replies and handles;
one dispatcher task runs triggers and notifications one at a time, in completion order.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Generator
from types import TracebackType
from typing import Any, cast

from pbt_server.client._core import (
    Address,
    Call,
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


async def connect(
    address: str | os.PathLike[str] | tuple[str, int] | None = None,
    *,
    token: str = "",
    timeout: float = 10.0,  # noqa: ASYNC109 (the blocking API's signature, SPEC §6)
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
        The open session; use it with ``async with`` to close it.

    Raises:
        ConnectionLost: the broker could not be reached or did not answer in time.
        PbtError: the broker refused the hello (e.g. ``AuthenticationFailed``).
    """
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    resolved = resolve_address(address)
    where = describe_address(resolved)
    loop = asyncio.get_running_loop()
    connection = _Connection(Core(max_frame=max_frame), max_frame, where)
    try:
        async with asyncio.timeout(timeout):
            if isinstance(resolved, tuple):
                await loop.create_connection(lambda: connection, *resolved)
            else:
                await loop.create_unix_connection(lambda: connection, resolved)
    except OSError as err:  # TimeoutError included
        detail = str(err) or f"no connection within {timeout} s"
        raise ConnectionLost(f"cannot connect to {where}: {detail}") from err
    session = Session(connection, resolved)
    try:
        await session._hello(token, timeout)
    except BaseException:
        await session.close()
        raise
    return session


class _Connection(asyncio.Protocol):
    """The transport's callbacks: frames in, core updated, triggers queued."""

    def __init__(self, core: Core, max_frame: int, where: str) -> None:
        self.core = core
        self.where = where
        self.decoder = FrameDecoder(max_frame, trusted=True)
        self.work: asyncio.Queue[TaskState[Any] | None] = asyncio.Queue()
        self.disconnected = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write stream; uvloop's transports are that without subclassing asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data):
                task = self.core.receive(message)
                if task is not None:
                    self.work.put_nowait(task)
        except ConnectionLost as err:
            self.lose(err.text)
        except ProtocolError as err:
            self.lose(f"bad frame from the server: {err.text}")

    def eof_received(self) -> bool | None:
        self.lose(None)  # a clean end of stream
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection to {self.where} broke: {exc}" if exc else None
        self.core.connection_lost(reason)  # no-op after close() or lose()
        self.work.put_nowait(None)  # after any queued work: skipped, the pages are closed
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def lose(self, reason: str | None) -> None:
        self.core.connection_lost(reason)
        if self.transport is not None:
            self.transport.close()

    def send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)


async def _run_dispatch(steps: Generator[Call, object, None]) -> None:
    # Core.dispatch decides; this only calls, awaiting what a callback returns if awaitable.
    try:
        callback, args = next(steps)
        while True:
            try:
                value = callback(*args)
                if inspect.isawaitable(value):
                    value = await value
            except BaseException as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                    raise  # the dispatcher itself is being cancelled (session closing)
                # A trigger's own CancelledError or SystemExit: Core.dispatch reports it.
                callback, args = steps.throw(exc)
            else:
                callback, args = steps.send(value)
    except StopIteration:
        pass


class Session(SessionBase):
    """One connection to the broker (a *parent session*). Create it with :func:`connect`."""

    def __init__(self, connection: _Connection, address: Address) -> None:
        super().__init__(connection.core, address)
        self._connection = connection
        self._dispatcher = asyncio.create_task(self._dispatch(), name="pbt-client-dispatch")

    async def open_page(self, name: str, record_id: str = "") -> Page:
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
        reply = await self._request("open_page", {"name": name, "record": record_id})
        page = Page(self, field(reply, "page", int), name, record_id)
        self._core.add_page(page)
        return page

    async def ping(self) -> None:
        """Round-trip to the broker.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        await self._request("ping", {})

    async def status(self) -> dict[str, object]:
        """The broker's status: ``sessions`` and ``workers``, each a list of maps.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        return status_fields(await self._request("status", {}))

    async def close(self) -> None:
        """Close the session; the broker cancels its tasks. Idempotent.

        Unresolved handles end with ``BackgroundTaskCanceled`` (code ``SessionClosed``);
        queued triggers do not run. Safe to call from a trigger.
        """
        self._core.close()
        connection = self._connection
        if connection.transport is not None:
            connection.transport.close()
            await connection.disconnected
        else:
            connection.work.put_nowait(None)
        dispatcher = self._dispatcher
        if dispatcher is not asyncio.current_task() and not dispatcher.done():
            await asyncio.wait({dispatcher})

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _hello(self, token: str, seconds: float) -> None:
        hello = {"protocol": PROTOCOL_VERSION, "token": token}
        try:
            reply = await self._request("hello", hello, seconds=seconds)
        except TimeoutError as err:
            where = describe_address(self._address)
            raise ConnectionLost(f"{where}: no answer to hello within {seconds} s") from err
        except ConnectionLost as err:
            if self._core.refusal is not None:
                raise self._core.refusal from err
            raise
        announced = self._core.welcome(reply)
        # A result may be as large as the broker's MaxFrameBytes, whatever we assumed.
        decoder = self._connection.decoder
        decoder.max_frame = max(decoder.max_frame, announced)

    async def _request(
        self,
        op: str,
        fields: dict[str, object],
        task: TaskState[Any] | None = None,
        seconds: float | None = None,
    ) -> Message:
        event = asyncio.Event()
        pending, frame = self._core.request(op, fields, event, task)
        self._connection.send(frame)
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except BaseException:  # timed out or cancelled: a late answer is ignored
            self._core.abandon(pending)
            raise
        return pending.result()

    async def _dispatch(self) -> None:
        work = self._connection.work
        while (task := await work.get()) is not None:
            await _run_dispatch(self._core.dispatch(task))


class Page(PageState):
    """A page opened in a session (:meth:`Session.open_page`).

    Set ``on_completed(task_id, results)`` and ``on_error(task_id, code, text, call_stack)
    -> is_handled`` to receive task outcomes: plain functions or ``async def``, run one at
    a time by the session's dispatcher task.
    """

    def __init__(self, session: Session, page_id: int, name: str, record_id: str) -> None:
        super().__init__(page_id, name, record_id)
        self._session = session

    @property
    def session(self) -> Session:
        """The session this page belongs to."""
        return self._session

    async def enqueue_background_task(
        self,
        codeunit_id: int,
        parameters: dict[str, str] | None = None,
        timeout: int | None = None,  # noqa: ASYNC109 (the task's timeout in ms, not a wait)
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
        fields = session._core.enqueue(self, task, codeunit_id, parameters, timeout, error_level)
        await session._request("enqueue", fields, task)
        return task

    async def cancel_background_task(self, task_id: int) -> bool:
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
        if not session._core.should_cancel(self, task_id):
            return False
        try:
            reply = await session._request("cancel", {"task": task_id})
        except ConnectionLost:
            return False  # the task has ended with ConnectionLost already
        return reply.get("cancelled") is True

    async def set_record(self, record_id: str) -> None:
        """Move the page to another record; its tasks enqueued under the old one are cancelled.

        Raises:
            TypeError: record_id is not a str.
            ValueError: record_id is too long.
            ClientClosed: the page or session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        await session._request("set_record", session._core.set_record(self, record_id))

    async def close(self) -> None:
        """Close the page; its tasks are cancelled. Idempotent.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        if session._core.close_page(self):
            await session._request("close_page", {"page": self.id})


class BackgroundTask(TaskState[Page]):
    """The handle of an enqueued task: a future resolved exactly once."""

    def __init__(self, page: Page) -> None:
        self._event = asyncio.Event()
        super().__init__(page, self._event)

    async def result(self, timeout: float | None = None) -> dict[str, str]:  # noqa: ASYNC109
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
        await self._wait(timeout)
        return self._outcome()

    async def exception(self, timeout: float | None = None) -> PbtError | None:  # noqa: ASYNC109
        """Wait for the outcome; return the error :meth:`result` would raise, or None.

        Raises:
            TimeoutError: no outcome within ``timeout``.
        """
        await self._wait(timeout)
        return self._error

    async def cancel(self) -> bool:
        """Same as ``await task.page.cancel_background_task(task.id)``."""
        return await self.page.cancel_background_task(self.id)

    async def _wait(self, seconds: float | None) -> None:
        if self._done:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError as err:
            raise TimeoutError(f"task {self.id} has no outcome after {seconds} s") from err
