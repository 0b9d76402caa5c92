"""Client connections: frames in, requests to the broker, replies and events out.

One :class:`ClientConnection` per socket (Unix or TCP). It owns the transport and the frame
decoder and nothing else: every request is handed to the broker's ``handle_request``, whose
answer (a reply map, or a :class:`PbtError`) goes back with the request's ``rid``. A frame
that breaks the protocol gets an ``error`` frame and closes this connection only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Final, Protocol, cast

from pbt_server.errors import AuthenticationFailed, PbtError, ProtocolError
from pbt_server.protocol import FrameDecoder, Hello, Request, encode_frame, parse_request

HELLO_TIMEOUT: Final = 10.0  # a connection that never says hello is closed
HELLO_MAX_FRAME: Final = 4096  # before hello, nobody gets to make us buffer a large frame
WRITE_HIGH_WATER: Final = 4 << 20  # stop reading a client that does not read its events

log = logging.getLogger(__name__)


class RequestHandler(Protocol):
    def connection_made(self, connection: ClientConnection) -> None: ...
    def handle_request(
        self, connection: ClientConnection, request: Request
    ) -> dict[str, object]: ...
    def connection_lost(self, connection: ClientConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    def __init__(self, handler: RequestHandler, *, max_frame: int, tcp: bool) -> None:
        self.handler = handler
        self.tcp = tcp
        self.max_frame = max_frame
        self.decoder = FrameDecoder(HELLO_MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.session_id = 0  # set by the broker on hello
        self.peer = ""
        self._hello_timer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write stream; uvloop's transports are that without subclassing asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if self.tcp and peer else "unix"
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(HELLO_TIMEOUT, self._hello_expired)
        try:
            self.handler.connection_made(self)
        except PbtError as err:
            self.fail(err)

    def data_received(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data):
                if not self.open:
                    return
                self._handle(message)
        except ProtocolError as err:
            self.fail(err)

    def _handle(self, message: dict[str, object]) -> None:
        rid = message.get("rid")
        try:
            request = parse_request(message)
            if self.session_id == 0 and not isinstance(request, Hello):
                raise ProtocolError(f"{request.op} before hello; say hello first")
            reply = self.handler.handle_request(self, request)
        except (ProtocolError, AuthenticationFailed) as err:
            self.fail(err, rid)
            return
        except PbtError as err:  # the request failed; the connection is fine
            self.send({"op": "error", "rid": request.rid, "code": err.code, "text": err.text})
            return
        except Exception:
            # A bug of ours: this connection gets an error and is closed; the broker goes on.
            log.exception("request %r failed (session %d)", message.get("op"), self.session_id)
            self.fail(
                PbtError("internal server error; see the server log", code="InternalError"), rid
            )
            return
        if isinstance(request, Hello):
            self.decoder.max_frame = self.max_frame
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
        reply["op"] = "reply"
        reply["rid"] = request.rid
        self.send(reply)

    def send(self, message: Mapping[str, object]) -> None:
        if self.open:
            assert self.transport is not None
            self.transport.write(encode_frame(message))

    def fail(self, err: PbtError, rid: object = None) -> None:
        """Tell the peer what it did wrong, then close this connection only."""
        log.warning("closing connection %s (session %d): %s", self.peer, self.session_id, err)
        rid = rid if type(rid) is int else None
        self.send({"op": "error", "rid": rid, "code": err.code, "text": err.text})
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered, then closes

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self.session_id == 0:
            self.fail(ProtocolError(f"no hello within {HELLO_TIMEOUT:.0f} s"))

    # Backpressure: a client that does not read its events stops being read from, so it
    # cannot make the broker buffer without bound.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.handler.connection_lost(self)
        self.transport = None
