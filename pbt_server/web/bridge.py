"""The WebSocket endpoint: one socket per tab, one parent session per tab, resumable.

::

    browser tab ──WebSocket──> Bridge.websocket: Origin, authorize(), hello
                                  │ new: aio.connect() ──────────────> broker session
                                  │ resume (token): the Tab kept in its grace window
                                  ▼
                               Tab.handle(request) ── aio client ──> broker
    browser tab <──seq'd JSON── Tab.send(...) <── triggers <── outcomes

A socket that drops without the browser saying goodbye leaves its Tab for ``[Web]
ReconnectGrace``; a reconnect with the tab's token inside that window takes it over, and
after it the session is closed (the broker cancels its tasks and kills their workers).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine, Iterable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketState

from pbt_server.errors import ConnectionLost, PbtError, ProtocolError
from pbt_server.web.access import (
    Access,
    AccessDenied,
    Authorize,
    OriginNotAllowed,
    SessionExpired,
    call_authorize,
    origin_allowed,
)
from pbt_server.web.messages import Ack, Close, Hello, encode, parse
from pbt_server.web.messages import Request as BrowserRequest
from pbt_server.web.tab import Address, Tab, open_session

log = logging.getLogger("pbt_server.web")

HELLO_TIMEOUT: Final = 10.0
# Broker connections opened at once: the broker's listen backlog is asyncio's default (100),
# and a Unix socket whose backlog is full refuses at once (EAGAIN) instead of retrying, so a
# burst of tabs (every tab reconnecting after a restart) would otherwise fail some of them.
CONNECTING_AT_ONCE: Final = 32
# The browser closed the session or left the page, or the WebSocket layer closed a socket
# that broke its rules (protocol error, bad data, message too big): no grace for those.
END_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009})
CLOSE_CODES: Final[dict[str, int]] = {
    "ProtocolError": 4400,
    "AccessDenied": 4403,
    "OriginNotAllowed": 4403,
    "SessionExpired": 4410,
    "ConnectionLost": 4502,
    "ServerBusy": 4503,
    "ServerShuttingDown": 4503,
}


class Bridge:
    """The tabs of one web app and the endpoint that serves them."""

    def __init__(
        self,
        address: Address,
        *,
        token: str,
        authorize: Authorize,
        grace: float,
        allowed_origins: Iterable[str],
        max_message: int,
    ) -> None:
        self.address = address
        self.token = token
        self.authorize = authorize
        self.grace = grace
        self.allowed_origins = tuple(allowed_origins)
        self.max_message = max_message
        self.tabs: dict[str, Tab] = {}  # by resume token
        self._connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
        self._ending: set[asyncio.Task[None]] = set()

    # --- the WebSocket -----------------------------------------------------------------

    async def websocket(self, socket: WebSocket) -> None:
        """Serve one tab's WebSocket until it closes."""
        origin, host = socket.headers.get("origin"), socket.headers.get("host")
        await socket.accept()
        if not origin_allowed(origin, host, self.allowed_origins):
            await _fatal(socket, OriginNotAllowed(f"pages from {origin!r:.100} may not connect"))
            return
        try:
            access = await call_authorize(self.authorize, socket)
        except Exception:
            log.exception("authorize() failed; connection refused")
            await _fatal(socket, AccessDenied("authorize() failed; see the server log"))
            return
        if access is None:
            await _fatal(socket, AccessDenied("this browser may not open a session"))
            return
        try:
            tab = await self._start(socket, access)
        except PbtError as err:
            await _fatal(socket, err)
            return
        await self._serve(socket, tab)

    async def _start(self, socket: WebSocket, access: Access) -> Tab:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                message = await socket.receive()
        except TimeoutError:
            raise ProtocolError(f"no hello within {HELLO_TIMEOUT:.0f} s") from None
        if message["type"] == "websocket.disconnect":
            raise ConnectionLost("the browser left before hello")
        hello, _ = parse(message.get("text", message.get("bytes")), self.max_message)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"{hello.op} before hello; say hello first")
        if hello.resume is not None:
            tab = self.tabs.get(hello.resume)
            if tab is None or tab.ended:
                raise SessionExpired("the session ended (closed, or away longer than the grace)")
            if tab.access != access:
                raise AccessDenied("the session belongs to another user")
            old = tab.socket
            if old is not None:  # a half-open connection the server had not noticed yet
                tab.detach(old)
                self._spawn(_close(old, 4409, "replaced by a newer connection"))
            resumed = True
        else:
            if hello.seq:
                raise ProtocolError("hello: seq without resume")
            async with self._connecting:
                session = await open_session(self.address, self.token, access.context)
            tab = Tab(session, access, secrets.token_urlsafe(24), self.end_soon)
            self.tabs[tab.token] = tab
            self._watch(tab)
            resumed = False
        welcome = {
            "op": "welcome",
            "session": tab.session.id,
            "token": tab.token,
            "resumed": resumed,
            "grace": round(self.grace * 1000),
            "max_message": self.max_message,
        }
        try:
            await tab.attach(socket, hello.seq, welcome)
        except PbtError as err:
            if not resumed or isinstance(err, SessionExpired):
                await self.end(tab, None)
            raise
        log.debug("session %d: %s", tab.session.id, "resumed" if resumed else "opened")
        return tab

    async def _serve(self, socket: WebSocket, tab: Tab) -> None:
        code = 1006  # cancelled (the server is stopping) counts as a drop, not a goodbye
        try:
            code = await self._receive(socket, tab)
        except PbtError as err:  # forged or broken input, or the broker went away
            log.warning("session %d: closing its tab: %s", tab.session.id, err)
            tab.detach(socket)
            await _fatal(socket, err)
            await self.end(tab, None)
        except Exception:
            log.exception("session %d: bridge error; closing its tab", tab.session.id)
            tab.detach(socket)
            await _fatal(
                socket, PbtError("internal error; see the server log", code="InternalError")
            )
            await self.end(tab, None)
        finally:
            if tab.detach(socket) and not tab.ended:
                if code in END_CODES:
                    self.end_soon(tab, None)
                else:
                    log.debug(
                        "session %d: socket dropped (%d); %.1f s grace",
                        tab.session.id,
                        code,
                        self.grace,
                    )
                    loop = asyncio.get_running_loop()
                    tab.grace_timer = loop.call_later(self.grace, self._expire, tab)

    async def _receive(self, socket: WebSocket, tab: Tab) -> int:
        """Handle the tab's messages until its socket closes; return the close code."""
        while not tab.ended:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                code: int = message.get("code", 1006)
                return code
            parsed, ack = parse(message.get("text", message.get("bytes")), self.max_message)
            if ack is not None:
                tab.acknowledge(ack)
            if isinstance(parsed, Ack):
                tab.acknowledge(parsed.seq)
            elif isinstance(parsed, Close):
                await self.end(tab, None)
            elif isinstance(parsed, BrowserRequest):
                await tab.handle(parsed)
            else:
                raise ProtocolError(f"{parsed.op}: this session has said hello already")
        return 1000

    # --- ending ------------------------------------------------------------------------

    async def end(self, tab: Tab, error: PbtError | None) -> None:
        """End ``tab``'s session now: its tasks are cancelled and their workers killed."""
        if tab.ended:
            return
        tab.ended = True
        self.tabs.pop(tab.token, None)
        if tab.grace_timer is not None:
            tab.grace_timer.cancel()
            tab.grace_timer = None
        socket = tab.socket
        if socket is not None:
            tab.detach(socket)
            if error is not None:
                await _fatal(socket, error)
            else:
                await _close(socket, 1000, "session closed")
        await tab.session.close()
        log.debug("session %d: ended", tab.session.id)

    def end_soon(self, tab: Tab, error: PbtError | None) -> None:
        self._spawn(self.end(tab, error))

    def _expire(self, tab: Tab) -> None:
        tab.grace_timer = None
        if tab.socket is None:
            log.info("session %d: no reconnect within %.1f s; ended", tab.session.id, self.grace)
            self.end_soon(tab, None)

    def _watch(self, tab: Tab) -> None:
        closed = asyncio.ensure_future(tab.session.wait_closed())

        def lost(done: asyncio.Future[PbtError]) -> None:
            if not tab.ended and not done.cancelled():
                self.end_soon(tab, ConnectionLost(f"pbt-server: {done.result().text}"))

        closed.add_done_callback(lost)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def close_beacon(self, request: Request) -> Response:
        """``POST <mount>/close`` with the tab's token: ``pagehide`` ends its session at once."""
        body = await request.body()
        tab = self.tabs.get(body[:100].decode("ascii", "replace"))
        if tab is not None:
            await self.end(tab, None)
        return Response(status_code=204)

    async def aclose(self) -> None:
        """End every tab (the app is shutting down)."""
        await asyncio.gather(*(self.end(tab, None) for tab in list(self.tabs.values())))
        if self._ending:
            await asyncio.wait(self._ending)


async def _fatal(socket: WebSocket, err: PbtError) -> None:
    """Say what was wrong (``rid`` null, no ``seq``), then close with the error's code."""
    if socket.application_state is WebSocketState.CONNECTED:
        try:
            await socket.send_text(
                encode({"op": "error", "rid": None, "code": err.code, "text": err.text})
            )
        except Exception:
            return
    await _close(socket, CLOSE_CODES.get(err.code, 4400), err.code)


async def _close(socket: WebSocket, code: int, reason: str) -> None:
    if socket.application_state is WebSocketState.CONNECTED:
        try:
            await socket.close(code, reason[:120])
        except Exception:  # the peer is gone already
            log.debug("close(%d) on a dead socket", code)
