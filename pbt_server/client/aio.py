"""The asyncio client library: the names of :mod:`pbt_server.client`, awaitable.

::

    from pbt_server.client.aio import connect

    async with await connect("var/pbt.sock") as session:
        page = await session.open_page("Customer Card", record_id="Customer: 10000")
        page.on_completed = show_results          # a plain function or an ``async def``
        task = await page.enqueue_background_task(50100, {"Wait": "1000"})
        print(await task.result(timeout=5))

The transport's protocol callbacks feed the shared core and resolve replies and handles;
one dispatcher task runs triggers and notifications one at a time, in completion order. It
works on any asyncio loop, uvloop's included.

Cheap on the hot path: the socket is read into one buffer of the connection's
(``BufferedProtocol``: no 256 KiB allocation per read, which glibc serves with mmap), and
replies and outcomes wake their waiters through futures of the connection's loop
(``asyncio.Event`` and ``asyncio.timeout`` look the loop up on each use, which on 3.11
costs a ``getpid`` syscall each time).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, cast

# The names both flavours share come from the blocking one; __all__ is checked equal to its.
from pbt_server.client import (
    AuthenticationFailed,
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ClientClosed,
    ConnectionLost,
    EnqueueError,
    ErrorLevel,
    InvalidParameters,
    MemoryBudgetExceeded,
    NotAllowed,
    Notification,
    PageClosed,
    PbtError,
    QueueFull,
    ServerBusy,
    ServerShuttingDown,
    UnknownCodeunit,
    _from_config,
    _hello_fields,
)
from pbt_server.client._core import (
    DEFAULT_KEEPALIVE,
    Address,
    AddressArg,
    Call,
    Core,
    PageBase,
    SessionBase,
    TaskBase,
    Work,
    check_text,
    describe_address,
    is_current,
    is_due,
    refuse_in_child_session,
    resolve_addresses,
    status_fields,
    work_task,
)
from pbt_server.errors import ProtocolError
from pbt_server.protocol import DEFAULT_MAX_FRAME, FrameDecoder

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


async def connect(
    address: AddressArg | Sequence[AddressArg] | None = None,
    *,
    token: str = "",
    timeout: float = 10.0,  # noqa: ASYNC109 (the blocking API's signature)
    max_frame: int = DEFAULT_MAX_FRAME,
    context: Mapping[str, str] | None = None,
    keepalive: float | None = DEFAULT_KEEPALIVE,
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
        config: a ``server.ini`` to find the server by, as the server does (its
            ``PBT_*`` overrides apply): its socket, or its TCP address and token.
        operator: an operator's connection, for ``status`` and ``ping`` only; it does not
            count against ``MaxConnections``, so it works when the server is full.

    Returns:
        The open session; use it with ``async with`` to close it.

    Raises:
        ConnectionLost: the broker could not be reached or did not answer in time.
        NotAllowed: called inside a child session (a codeunit cannot start tasks).
        PbtError: the broker refused the hello (e.g. ``AuthenticationFailed``).
    """
    refuse_in_child_session()
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    fields = _hello_fields(token, context, operator)
    if address is None and config is not None:
        address, fields["token"] = _from_config(config, token)
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    for resolved in resolve_addresses(address):
        where = describe_address(resolved)
        connection = _Connection(Core(max_frame=max_frame), max_frame, where, keepalive)
        try:
            async with asyncio.timeout(timeout):
                factory = _factory(connection)
                if isinstance(resolved, tuple):
                    await loop.create_connection(factory, *resolved)
                else:
                    await loop.create_unix_connection(factory, resolved)
        except OSError as err:  # TimeoutError included
            detail = str(err) or f"no connection within {timeout} s"
            errors.append(f"cannot connect to {where}: {detail}")
            continue
        session = Session(connection, resolved)
        try:
            await session._hello(fields, timeout)
        except BaseException:
            await session.close()
            raise
        return session
    raise ConnectionLost("; ".join(errors))


_SETTLE_TURNS = 3  # loop turns between a TaskId's return and its trigger


def _factory(connection: _Connection) -> Callable[[], _Connection]:
    return lambda: connection


_RECV_SIZE: Final = 64 * 1024


class _Flag:
    """The core's signal in this flavour: an ``asyncio.Event`` whose loop is known."""

    __slots__ = ("_loop", "_waiters", "is_set")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] | None = None
        self.is_set = False

    def set(self) -> None:
        if not self.is_set:  # idempotent: an outcome may signal on arrival and on decision
            self.is_set = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self.is_set = False

    async def wait(self, seconds: float | None = None) -> None:
        """Wait until set; TimeoutError after ``seconds`` (None: no limit)."""
        if self.is_set:
            return
        waiter = self._loop.create_future()  # one per waiter: cancelling it cancels no other
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            if seconds is None:
                await waiter
            else:
                async with asyncio.timeout(seconds):
                    await waiter
        finally:
            self._waiters.remove(waiter)


class _Connection(asyncio.BufferedProtocol):
    """The transport's callbacks: frames in, core updated, triggers queued."""

    def __init__(self, core: Core, max_frame: int, where: str, keepalive: float | None) -> None:
        self.core = core
        self.where = where
        self.decoder = FrameDecoder(max_frame, trusted=True)
        self.work: asyncio.Queue[Work | None] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self._buffer = memoryview(bytearray(_RECV_SIZE))  # what the transport reads into
        self._outbox: list[bytes] | None = None  # frames to write at the end of this turn
        self.disconnected = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.keepalive = keepalive or None
        self._heard = True  # something arrived since the last keepalive check
        self._pinged = False
        self._keepalive_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write stream; uvloop's transports are that without subclassing asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.keepalive is not None:
            self._keepalive_timer = self.loop.call_later(self.keepalive, self._check_alive)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # A copy: the decoder may keep a partial frame, and the buffer is read into again.
        self.data_received(bytes(self._buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self._heard = True
        self._pinged = False
        try:
            for message in self.decoder.feed(data):
                self.core.receive(message)
        except ConnectionLost as err:
            self.lose(err.text)
        except ProtocolError as err:
            self.lose(f"bad frame from the server: {err.text}")
        self.flush()

    def flush(self) -> None:
        """Queue what became due; send the cancels of abandoned enqueues."""
        for work in self.core.take_work():
            self.work.put_nowait(work)
        for frame in self.core.take_orphans():
            self.send(frame)

    def eof_received(self) -> bool | None:
        pending = self.decoder.pending
        if pending:
            self.lose(
                f"the connection ended inside a frame ({pending} bytes of it arrived): truncated"
            )
        else:
            self.lose(None)  # a clean end of stream
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        reason = f"connection to {self.where} broke: {exc}" if exc else None
        self.core.connection_lost(reason)  # no-op after close() or lose()
        self.flush()
        self.work.put_nowait(None)  # after any queued work: decided cancelled or lost
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def lose(self, reason: str | None) -> None:
        self.core.connection_lost(reason)
        self.flush()
        if self.transport is not None:
            self.write_outbox()
            self.transport.close()

    def send(self, frame: bytes) -> None:
        # Frames sent in one turn of the loop go out in one write, at the end of the turn.
        if self._outbox is None:
            self._outbox = [frame]
            self.loop.call_soon(self.write_outbox)
        else:
            self._outbox.append(frame)

    def write_outbox(self) -> None:
        frames, self._outbox = self._outbox, None
        if frames and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _check_alive(self) -> None:
        assert self.keepalive is not None
        if self.core.ended:
            return
        if not self._heard:
            if self._pinged:
                text = f"the server did not answer a keepalive ping within {self.keepalive} s"
                self.lose(text)
                return
            self._pinged = True
            _, frame = self.core.request("ping", {}, _Flag(self.loop))
            self.send(frame)
        self._heard = False
        self._keepalive_timer = self.loop.call_later(self.keepalive, self._check_alive)


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
        page = Page(self, reply["page"], name, record_id)
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
        """The broker's status: ``server``, ``sessions`` and ``workers``.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        return status_fields(await self._request("status", {}))

    async def wait_closed(self) -> PbtError:
        """Wait until the session has ended; return why (``ClientClosed`` if you closed it,
        ``ConnectionLost`` with the reason if the broker went away)."""
        await asyncio.shield(self._connection.disconnected)
        return self._core.ended_error()

    async def close(self) -> None:
        """Close the session; the broker cancels its tasks. Idempotent.

        Unresolved handles end with ``BackgroundTaskCanceled`` (code ``SessionClosed``);
        queued triggers do not run. Safe to call from a trigger.
        """
        self._core.close()
        connection = self._connection
        connection.flush()
        if connection.transport is not None:
            connection.write_outbox()  # what this turn sent (cancels), before the close
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

    async def _hello(self, fields: dict[str, object], seconds: float) -> None:
        try:
            reply = await self._request("hello", fields, seconds=seconds)
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
        task: TaskBase[Any] | None = None,
        seconds: float | None = None,
    ) -> dict[str, Any]:
        flag = _Flag(self._connection.loop)
        pending, frame = self._core.request(op, fields, flag, task)
        self._connection.send(frame)
        try:
            await flag.wait(seconds)
        except BaseException:
            # Timed out or cancelled: a late answer is ignored, and a task it enqueued is
            # cancelled as soon as its id is known (no task without an owner).
            self._core.abandon(pending)
            self._connection.flush()
            raise
        return pending.result()

    async def _dispatch(self) -> None:
        work_queue = self._connection.work
        while (work := await work_queue.get()) is not None:
            task = work_task(work)
            if isinstance(task, BackgroundTask):
                if not is_due(work):
                    await task._returned_flag.wait()  # the caller has its TaskId first
                # ... also a caller that awaits the enqueue through asyncio.wait_for or a
                # task of its own, which resumes a loop turn or two after the call returned
                for _ in range(_SETTLE_TURNS):
                    await asyncio.sleep(0)
            if isinstance(work, TaskBase):
                self._core.decide(work)
                self._connection.flush()
            await _run_dispatch(self._core.dispatch(work))


class Page(PageBase):
    """A page opened in a session (:meth:`Session.open_page`).

    Set ``on_completed(task_id, results)``, ``on_error(task_id, code, text, call_stack)
    -> is_handled``, ``on_pending_changed(count)`` and ``on_progress(task_id, progress)`` to
    follow its tasks: plain functions or ``async def``, run one at a time by the session's
    dispatcher task.
    """

    _session: Session

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
            The task handle. Its triggers run only after this call has returned; if the
            call is cancelled instead, the task is cancelled too.

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
        fields = session._core.enqueue(self, task, codeunit_id, parameters, timeout, error_level)
        await session._request("enqueue", fields, task)
        task._returned = True
        task._returned_flag.set()
        return task

    async def try_enqueue_background_task(
        self,
        codeunit_id: int,
        parameters: dict[str, str] | None = None,
        timeout: int | None = None,  # noqa: ASYNC109 (the task's timeout in ms, not a wait)
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
            task = await self.enqueue_background_task(codeunit_id, parameters, timeout, error_level)
        except (EnqueueError, ServerBusy) as err:
            self.last_enqueue_error = err
            return None
        self.last_enqueue_error = None
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
        local = session._core.cancel(self, task_id)
        session._connection.flush()
        if local is not None:
            return local
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
        fields = session._core.set_record(self, record_id)
        session._connection.flush()
        await session._request("set_record", fields)

    async def close(self) -> None:
        """Close the page; its tasks are cancelled. Idempotent.

        Raises:
            ClientClosed: the session was closed.
            ConnectionLost: the connection broke.
        """
        session = self._session
        closing = session._core.close_page(self)
        session._connection.flush()
        if closing:
            await session._request("close_page", {"page": self.id})


class BackgroundTask(TaskBase[Page]):
    """The handle of an enqueued task: a future resolved exactly once."""

    _signal: _Flag

    def __init__(self, page: Page) -> None:
        loop = page.session._connection.loop
        self._returned_flag = _Flag(loop)
        super().__init__(page, _Flag(loop))

    def done(self) -> bool:
        """Return True once the task has its outcome (results, error or cancellation).

        Only :meth:`result` and :meth:`exception` take the outcome, and so decide it: an
        outcome nobody took yet becomes a cancellation if the page moves on first.
        """
        return self._done or self._arrived is not None

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

    async def progress_updates(self) -> AsyncIterator[dict[str, str]]:
        """The task's progress as it changes, until its outcome arrives::

            async for progress in task.progress_updates():
                bar.show(progress["done"], progress["of"])
            results = await task.result()

        Yields the latest value first if there is one; a consumer slower than the updates
        gets the latest each time, not every one. Ends (without raising) when the outcome
        arrives, whatever it is, or when the page moves on; :meth:`result` tells which.
        """
        seen = 0
        flag = _Flag(self.page.session._connection.loop)
        if self._watchers is None:
            self._watchers = []
        self._watchers.append(flag)
        try:
            while is_current(self):
                if self._progress_seq != seen and self._progress is not None:
                    seen = self._progress_seq
                    yield dict(self._progress)
                    continue
                flag.clear()
                await flag.wait()
        finally:
            self._watchers.remove(flag)

    async def _wait(self, seconds: float | None) -> None:
        if not self._done:
            try:
                await self._signal.wait(seconds)
            except TimeoutError as err:
                raise TimeoutError(f"task {self.id} has no outcome after {seconds} s") from err
        self._decide()

    def _decide(self) -> None:
        if not self._done and self._arrived is not None:
            session = self.page.session
            session._core.decide(self)
            session._connection.flush()
