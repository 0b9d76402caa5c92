"""One browser tab's parent session: its broker session, its pages, its outgoing stream.

A :class:`Tab` outlives its WebSocket by the grace window: while no socket is attached,
what it would send is kept (numbered by ``seq``), and a resume sends again what the browser
had not seen. Outcomes reach the browser through the asyncio client's triggers, so the
client's record check (no outcome for a page that moved on) holds here too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from starlette.websockets import WebSocket

from pbt_server.client import aio
from pbt_server.errors import PageNotFound, PbtError, ProtocolError
from pbt_server.web.access import Access, CodeunitNotAllowed, SessionExpired
from pbt_server.web.messages import (
    Cancel,
    ClosePage,
    Enqueue,
    OpenPage,
    Ping,
    Request,
    SetRecord,
    encode,
)

log = logging.getLogger("pbt_server.web")

KEEP_MESSAGES: Final = 1024  # sent but not acknowledged, or waiting for a reconnect
KEEP_BYTES: Final = 4 << 20

Address = str | tuple[str, int]
EndHook = Callable[["Tab", PbtError | None], None]


async def open_session(address: Address, token: str, context: Mapping[str, str]) -> aio.Session:
    """Connect to the broker as the tab's parent session, with the user's context."""
    return await aio.connect(address, token=token, context=dict(context))


class Tab:
    """The state of one tab's session; the bridge feeds it requests and sockets."""

    def __init__(self, session: aio.Session, access: Access, token: str, end: EndHook) -> None:
        self.session = session
        self.end = end  # the bridge's: end this tab, telling the browser why
        self.access = access
        self.token = token
        self.pages: dict[int, aio.Page] = {}
        self.last_rid = 0
        self.ended = False
        self.socket: WebSocket | None = None
        self.grace_timer: asyncio.TimerHandle | None = None
        self._seq = 0  # of the last message queued
        self._sent = 0  # the last seq sent on the current socket (or seen by the browser)
        self._kept: deque[tuple[int, str]] = deque()
        self._kept_bytes = 0
        self._lock = asyncio.Lock()
        self._held: list[dict[str, object]] | None = None  # events held during an enqueue

    # --- the socket --------------------------------------------------------------------

    async def attach(self, socket: WebSocket, seen: int, welcome: dict[str, object]) -> None:
        """Make ``socket`` this tab's; the browser has seen everything up to ``seen``.

        Raises:
            ProtocolError: ``seen`` is ahead of what was sent.
            SessionExpired: messages after ``seen`` are no longer kept.
        """
        if seen > self._seq:
            raise ProtocolError(f"hello: seq {seen} was never sent (last is {self._seq})")
        oldest = self._kept[0][0] if self._kept else self._seq + 1
        if seen + 1 < oldest:
            raise SessionExpired(f"messages {seen + 1}..{oldest - 1} of this session are gone")
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None
        self.acknowledge(seen)
        async with self._lock:
            self.socket = socket
            self._sent = seen
            await socket.send_text(encode({**welcome, "rid": self.last_rid}))
        await self._flush()

    def detach(self, socket: WebSocket) -> bool:
        """Forget ``socket`` if it is still this tab's; return whether it was."""
        if self.socket is not socket:
            return False
        self.socket = None
        return True

    def acknowledge(self, seq: int) -> None:
        """The browser has everything up to ``seq``: stop keeping it."""
        while self._kept and self._kept[0][0] <= seq:
            _, text = self._kept.popleft()
            self._kept_bytes -= len(text)

    # --- outgoing ----------------------------------------------------------------------

    async def send(self, message: dict[str, object]) -> None:
        """Number ``message``, keep it until acknowledged, send it if a socket is attached.

        Raises:
            SessionExpired: the browser left too much unread; the session must end.
        """
        self._seq += 1
        text = encode({**message, "seq": self._seq})
        self._kept.append((self._seq, text))
        self._kept_bytes += len(text)
        while len(self._kept) > KEEP_MESSAGES or self._kept_bytes > KEEP_BYTES:
            seq, dropped = self._kept.popleft()
            self._kept_bytes -= len(dropped)
            if seq > self._sent:
                raise SessionExpired(
                    f"more than {KEEP_MESSAGES} messages or {KEEP_BYTES >> 20} MiB"
                    " waited for this tab; its session ended"
                )
        await self._flush()

    async def _flush(self) -> None:
        # Whoever holds the lock sends everything still unsent, so seq order is send order.
        async with self._lock:
            while (socket := self.socket) is not None and self._sent < self._seq:
                first = self._kept[0][0] if self._kept else self._seq + 1
                seq, text = self._kept[self._sent + 1 - first]
                try:
                    await socket.send_text(text)
                except Exception:  # gone; its reader sees the disconnect and detaches
                    log.debug("tab %s: send failed; waiting for a reconnect", self.session.id)
                    return
                self._sent = seq

    async def _event(self, message: dict[str, object]) -> None:
        if self._held is not None:
            self._held.append(message)
            return
        try:
            await self.send(message)
        except SessionExpired as err:
            log.warning("session %d: %s", self.session.id, err)
            self.end(self, err)

    # --- requests ----------------------------------------------------------------------

    async def handle(self, request: Request) -> None:
        """Run one request and send its reply or error.

        Raises:
            ProtocolError: a forged request (rid out of order); the tab must close.
            ConnectionLost: the broker went away.
        """
        if request.rid <= self.last_rid:
            raise ProtocolError(
                f"{request.op}: rid {request.rid} is not larger than the last ({self.last_rid})"
            )
        self.last_rid = request.rid
        try:
            reply = await self._run(request)
        except ProtocolError:
            raise
        except PbtError as err:
            if self.session.closed:
                raise
            await self.send({"op": "error", "rid": request.rid, "code": err.code, "text": err.text})
        else:
            await self.send({"op": "reply", "rid": request.rid, **reply})
        finally:
            held, self._held = self._held, None
            for message in held or ():
                await self._event(message)

    async def _run(self, request: Request) -> dict[str, object]:
        if isinstance(request, OpenPage):
            return await self._open_page(request)
        if isinstance(request, Ping):
            await self.session.ping()
            return {}
        if isinstance(request, Enqueue):
            page = self._page(request.op, request.page)
            if request.codeunit not in self.access.codeunits:
                raise CodeunitNotAllowed(
                    f"codeunit {request.codeunit} is not allowed for this browser session"
                )
            # The task's outcome may be read before this coroutine resumes; its event waits
            # until the reply carrying the TaskId has gone out.
            self._held = []
            task = await page.enqueue_background_task(
                request.codeunit, request.parameters, request.timeout, request.level
            )
            return {"task": task.id, "timeout": task.timeout}
        if isinstance(request, Cancel):
            page = self._page(request.op, request.page)
            return {"cancelled": await page.cancel_background_task(request.task)}
        if isinstance(request, SetRecord):
            await self._page(request.op, request.page).set_record(request.record)
            return {}
        assert isinstance(request, ClosePage)
        page = self._page(request.op, request.page)
        del self.pages[page.id]
        await page.close()
        return {}

    def _page(self, op: str, page_id: int) -> aio.Page:
        page = self.pages.get(page_id)
        if page is None:
            raise PageNotFound(f"{op}: this session has no open page {page_id}")
        return page

    async def _open_page(self, request: OpenPage) -> dict[str, object]:
        page = await self.session.open_page(request.name, request.record)
        page_id = page.id

        async def on_completed(task_id: int, results: dict[str, str]) -> None:
            await self._event(
                {"op": "completed", "page": page_id, "task": task_id, "results": results}
            )

        async def on_error(task_id: int, code: str, text: str, stack: str) -> bool:
            failed = {"op": "failed", "page": page_id, "task": task_id, "code": code}
            await self._event({**failed, "text": text, "stack": stack})
            return True  # the browser's own onError and ErrorLevel decide what it shows

        async def on_progress(task_id: int, progress: dict[str, str]) -> None:
            await self._event(
                {"op": "progress", "page": page_id, "task": task_id, "progress": progress}
            )

        page.on_completed = on_completed
        page.on_error = on_error
        page.on_progress = on_progress
        self.pages[page_id] = page
        return {"page": page_id}
