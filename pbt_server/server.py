"""The socket server: listening sockets, and one :class:`ClientConnection` per client.

A connection owns its transport and its frame decoder and nothing else: every request is
validated against its declaration and handed to the broker's ``handle_request``, whose answer
(a reply map, or a :class:`PbtError`) goes back with the request's ``rid``; an answer that
takes time (a reload) is a future, answered when it is done, while the connection goes on.
A frame that breaks the protocol gets an ``error`` frame and closes this connection only.

Admission. A connection that has not said ``hello`` has proved nothing, so it takes none of
the capacity of sessions: it gets a place in a small budget of its own (per listener, and per
peer address on TCP), a hello deadline (shorter on TCP), and 4 KiB frames; a full budget turns
new connections away with ``ServerBusy`` while every session and the Unix socket's operators
go on. Sessions (``MaxConnections``) and operator connections (``status``, ``ping``: a small
reserve of their own) are admitted by the broker at ``hello``.

Memory. A frame whose header has arrived reserves its announced length from the broker's
memory budget until it is complete; when the budget is spent, that connection is told so and
closed, instead of the broker growing towards the OOM killer.

Stopping. :meth:`Listeners.close` stops accepting; :meth:`Listeners.drain` flushes what each
connection still has to send for a bounded time, then aborts the transports of peers that do
not read, so a stop finishes within its grace whatever the clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, cast

from pbt_server.budget import Budget
from pbt_server.config import ServerSection
from pbt_server.errors import (
    AuthenticationFailed,
    InternalError,
    MemoryBudgetExceeded,
    NotAllowed,
    PbtError,
    ProtocolError,
    ServerBusy,
)
from pbt_server.protocol import REQUESTS, FrameDecoder, Message, Request, encode_frame

HELLO_TIMEOUT_UNIX: Final = 10.0  # a connection that never says hello is closed
HELLO_TIMEOUT_TCP: Final = 3.0  # a remote peer gets less time to hold a place
HELLO_MAX_FRAME: Final = 4096  # before hello, nobody gets to make us buffer a large frame
PENDING_PER_LISTENER: Final = 256  # connections that have not said hello yet, per listener
PENDING_PER_PEER: Final = 16  # ... of them from one TCP peer, once the budget is half spent
WRITE_HIGH_WATER: Final = 4 << 20  # stop reading a client that does not read its events
FD_RESERVE: Final = 64  # fds kept free beyond connections: listeners, log, forks, pipes
# A burst of connects (200 browser tabs opening at once) must queue, not fail with EAGAIN;
# the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 1024

log = logging.getLogger(__name__)


Answer = Message | asyncio.Future[Message]  # a reply now, or one that comes later


class RequestHandler(Protocol):
    def handle_request(self, connection: ClientConnection, request: Request) -> Answer: ...
    def connection_lost(self, connection: ClientConnection) -> None: ...


@dataclass(slots=True)
class Gate:
    """Places for connections that have not said hello yet, kept apart from sessions."""

    per_listener: int = PENDING_PER_LISTENER
    per_peer: int = PENDING_PER_PEER
    # by listener ("unix", "tcp"): each waiting connection with its peer, oldest first
    pending: dict[str, dict[Hashable, str | None]] = field(default_factory=dict)
    peers: Counter[str] = field(default_factory=Counter)  # TCP peer (IPv6: its /64) -> pending

    def admit(
        self, listener: str, peer: str | None, who: Hashable
    ) -> tuple[str | None, Hashable | None]:
        """Take a place for ``who``; return ``(why there is none, None)`` or ``(None, the
        waiting connection it displaced, or None)``.

        A burst from one address (a proxy in front of the broker, a web bridge opening
        sessions for many tabs) may use half the places; beyond that, one peer may hold only
        ``per_peer``. When every place is taken, the newcomer displaces the connection that
        has waited longest (as sshd's MaxStartups drops): silent connections from many
        addresses cannot keep out a client that says hello at once.
        """
        waiting = self.pending.setdefault(listener, {})
        if (
            peer is not None
            and len(waiting) >= self.per_listener // 2
            and self.peers[peer] >= self.per_peer
        ):
            return f"{self.peers[peer]} connections from {peer} have not said hello yet", None
        displaced = None
        if len(waiting) >= self.per_listener:
            displaced = next(iter(waiting))
            self.leave(listener, displaced)
        waiting[who] = peer
        if peer is not None:
            self.peers[peer] += 1
        return None, displaced

    def leave(self, listener: str, who: Hashable) -> None:
        """``who`` said hello or went away (a second call does nothing)."""
        waiting = self.pending.get(listener, {})
        if who not in waiting:
            return
        peer = waiting.pop(who)
        if peer is not None:
            self.peers[peer] -= 1
            if not self.peers[peer]:
                del self.peers[peer]


class ClientConnection(asyncio.Protocol):
    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_frame: int,
        tcp: bool,
        gate: Gate,
        budget: Budget,
        connections: set[ClientConnection],
        emptied: asyncio.Event | None = None,
    ) -> None:
        self.handler = handler
        self.tcp = tcp
        self.max_frame = max_frame
        self.decoder = FrameDecoder(HELLO_MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.session_id = 0  # set by the broker on hello
        self.operator = False  # set by the broker on an operator's hello
        self.peer = ""
        self._gate = gate
        self._peer_host: str | None = None  # TCP: the peer's address (IPv6: its /64)
        self._budget = budget
        self._reserved = 0  # bytes of the memory budget held for a partial frame
        self._connections = connections
        self._emptied = emptied
        self._hello_timer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def identified(self) -> bool:
        return self.session_id != 0 or self.operator

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write stream; uvloop's transports are that without subclassing asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if self.tcp:
            tune_accepted(transport)
        if self.tcp and peer:
            self._peer_host = peer_key(str(peer[0]))
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.peer = "unix"
        refused, displaced = self._gate.admit(self._listener, self._peer_host, self)
        if refused is not None:
            self.fail(ServerBusy(f"the server is busy: {refused}"), quiet=True)
            return
        if isinstance(displaced, ClientConnection):
            displaced.fail(
                ServerBusy("the server is busy: displaced by a newer connection before hello"),
                quiet=True,
            )
        timeout = HELLO_TIMEOUT_TCP if self.tcp else HELLO_TIMEOUT_UNIX
        self._hello_timer = asyncio.get_running_loop().call_later(timeout, self._hello_expired)

    def data_received(self, data: bytes) -> None:
        try:
            for message in self.decoder.feed(data):
                if not self.open:
                    return
                self._handle(message)
        except ProtocolError as err:
            self.fail(err)
            return
        self._reserve()

    def _reserve(self) -> None:
        """Hold the budget for the partial frame's announced length while it arrives."""
        wanted = self.decoder.announced if self.decoder.pending else 0
        if wanted == self._reserved:
            return
        self._budget.give(self._reserved)
        self._reserved = 0
        if wanted and self.open:
            if not self._budget.take(wanted):
                self.fail(
                    MemoryBudgetExceeded(
                        f"a frame of {wanted} bytes does not fit the server's memory budget"
                        f" ({self._budget.used} of {self._budget.limit} bytes in use,"
                        " MaxBufferedMB)"
                    )
                )
                return
            self._reserved = wanted

    def _handle(self, raw: Message) -> None:
        rid = raw.get("rid")
        try:
            request = REQUESTS.validate(raw)
            if not self.identified and request["op"] != "hello":
                raise ProtocolError(f"{request['op']} before hello; say hello first")
            reply = self.handler.handle_request(self, request)
        except (ProtocolError, AuthenticationFailed, ServerBusy, NotAllowed) as err:
            self.fail(err, rid)
            return
        except PbtError as err:  # the request failed; the connection is fine
            self.send({"op": "error", "rid": request["rid"], "code": err.code, "text": err.text})
            return
        except Exception:
            # A bug of ours: this connection gets an error and is closed; the broker goes on.
            log.exception("request %r failed (session %d)", raw.get("op"), self.session_id)
            self.fail(InternalError("internal server error; see the server log"), rid)
            return
        if isinstance(reply, asyncio.Future):
            reply.add_done_callback(lambda done: self._answer_later(request, done))
            return
        if request["op"] == "hello":
            self._identified()
        reply["op"] = "reply"
        reply["rid"] = request["rid"]
        self.send(reply)

    def _answer_later(self, request: Request, done: asyncio.Future[Message]) -> None:
        rid = request["rid"]
        if done.cancelled():
            self.send({"op": "error", "rid": rid, "code": InternalError.code, "text": "cancelled"})
            return
        err = done.exception()
        if isinstance(err, PbtError):
            self.send({"op": "error", "rid": rid, "code": err.code, "text": err.text})
        elif err is not None:
            log.error("request %r failed", request["op"], exc_info=err)
            text = "internal server error; see the server log"
            self.send({"op": "error", "rid": rid, "code": InternalError.code, "text": text})
        else:
            reply = done.result()
            reply["op"] = "reply"
            reply["rid"] = rid
            self.send(reply)

    def _identified(self) -> None:
        self.decoder.max_frame = self.max_frame
        self._leave_gate()

    @property
    def _listener(self) -> str:
        return "tcp" if self.tcp else "unix"

    def _leave_gate(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._gate.leave(self._listener, self)

    def backlog(self) -> int:
        """Bytes written to this connection that the peer has not taken yet."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def send(self, message: Mapping[str, object]) -> None:
        if self.open:
            assert self.transport is not None
            self.transport.write(encode_frame(message))

    def fail(self, err: PbtError, rid: object = None, *, quiet: bool = False) -> None:
        """Tell the peer what it did wrong, then close this connection only."""
        (log.debug if quiet else log.warning)(
            "closing connection %s (session %d): %s: %s",
            self.peer,
            self.session_id,
            err.code,
            err.text,
        )
        rid = rid if type(rid) is int else None
        self.send({"op": "error", "rid": rid, "code": err.code, "text": err.text})
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered, then closes

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if not self.identified:
            timeout = HELLO_TIMEOUT_TCP if self.tcp else HELLO_TIMEOUT_UNIX
            self.fail(ProtocolError(f"no hello within {timeout:.0f} s"))

    # Backpressure: a client that does not read its events stops being read from, so it
    # cannot make the broker buffer without bound.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_gate()
        self._budget.give(self._reserved)
        self._reserved = 0
        self._connections.discard(self)
        if not self._connections and self._emptied is not None:
            self._emptied.set()
        self.handler.connection_lost(self)
        self.transport = None


# --- listening ----------------------------------------------------------------------------


class Listeners:
    """The broker's listening sockets and every connection they accepted."""

    def __init__(self, section: ServerSection, budget: Budget) -> None:
        self.section = section
        self.budget = budget
        self.gate = Gate()
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.Server] = []
        self.emptied = asyncio.Event()  # set when the last connection ended

    def factory(self, handler: RequestHandler, *, tcp: bool) -> Callable[[], ClientConnection]:
        def make() -> ClientConnection:
            return ClientConnection(
                handler,
                max_frame=self.section.max_frame_bytes,
                tcp=tcp,
                gate=self.gate,
                budget=self.budget,
                connections=self.connections,
                emptied=self.emptied,
            )

        return make

    async def listen(self, handler: RequestHandler) -> None:
        """Listen on the Unix socket (born 0600) and, if configured, on TCP.

        Raises:
            OSError: a socket cannot be bound.
            ServerBusy: another server listens on the Unix socket already.
        """
        loop = asyncio.get_running_loop()
        path = self.section.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _warn_if_shared(path.parent)
        _remove_stale_socket(path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            unix = await loop.create_unix_server(
                self.factory(handler, tcp=False), str(path), backlog=LISTEN_BACKLOG
            )
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.servers.append(unix)
        if self.section.tcp_address is not None:
            host, port = self.section.tcp_address
            tcp = await loop.create_server(
                self.factory(handler, tcp=True), host, port, backlog=LISTEN_BACKLOG
            )
            self.servers.append(tcp)

    def tcp_text(self) -> str:
        """``host:port`` of the TCP listener as bound (the port the OS chose for 0), or ''."""
        for server in self.servers[1:]:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return ""

    def close(self) -> None:
        """Stop accepting; connections that never said hello are closed now."""
        for server in self.servers:
            server.close()
        for connection in list(self.connections):
            if not connection.identified:
                connection.close()

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for closed connections to flush; abort the rest."""
        deadline = time.monotonic() + grace
        if self.connections:
            self.emptied.clear()
            # Transports close on their own as their buffers empty.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.emptied.wait()
        for connection in list(self.connections):
            log.warning(
                "connection %s (session %d) did not read what it was sent; aborted",
                connection.peer,
                connection.session_id,
            )
            connection.abort()
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                # Since 3.12 this waits for every connection; aborted ones end at once.
                async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                    await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.section.socket_path.unlink()


def peer_key(host: str) -> str:
    """What the gate counts a TCP peer by: its address, or for IPv6 its /64 (one host
    commonly holds a whole /64, so single addresses would give it places without end)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    except ValueError:
        return host


def tune_accepted(transport: asyncio.BaseTransport) -> None:
    """Keepalive on an accepted TCP connection: a peer that vanished (power, network) is
    found by the kernel within about a minute and its session ends."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _warn_if_shared(directory: Path) -> None:
    # The socket itself is 0600, but in a directory others may write to, another user can
    # replace it between our bind and a client's connect.
    mode = directory.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        log.warning(
            "the socket's directory %s is writable by every user; another user could replace"
            " the socket: choose a directory only the server's user can write",
            directory,
        )


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one's."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerBusy(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: stale
    else:
        raise ServerBusy(f"another server is listening on {path}")
    finally:
        probe.close()


def fit_fd_limit(wanted_connections: int, reserve: int) -> int:
    """Raise our open-file limit toward what ``MaxConnections`` needs; return what fits.

    Running out of fds would fail the fork of a replacement worker; so sessions beyond what
    the hard limit allows, less a reserve, are refused instead (``ServerBusy``), and the
    start says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = wanted_connections + reserve
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fitting = max(1, min(wanted_connections, soft - reserve))
    if fitting < wanted_connections:
        log.warning(
            "the open-file limit (%d) allows only %d sessions, not MaxConnections = %d;"
            " raise it (ulimit -n, LimitNOFILE=) to serve more",
            soft,
            fitting,
            wanted_connections,
        )
    return fitting
