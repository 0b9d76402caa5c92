"""A relay between the chaos clients and the broker that tampers with outcome events.

The ledger's self-test: with ``inject`` set, a client process connects its sessions through
this relay, which passes every byte from the clients to the broker as is, and every frame
from the broker to the clients except each 40th outcome event (``completed``, ``failed``,
``cancelled``), which it drops, sends twice, (a ``completed`` one) sends with another task's
token in its results, or follows with a ``progress`` event for the same task. The run must
then report violations naming those tasks.

It reads and writes the frames itself (4-byte big-endian length, one msgpack map), so what
it proves does not depend on the client library it feeds.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Final

import msgpack

from tests.chaos.ledger import OUTCOME_OPS

FAULTS: Final = ("drop", "duplicate", "misroute", "late_progress")
EVERY: Final = 40
_HEADER: Final = struct.Struct(">I")


def _frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _read_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            return None
        chunks += data
    return bytes(chunks)


class Tamperer:
    """Decides what the client gets for each broker frame (thread-safe; counts what it did)."""

    def __init__(self, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault to inject: {fault!r}; choose from {FAULTS}")
        self.fault = fault
        self.outcome_events = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        if message.get("op") not in OUTCOME_OPS:
            return [message]
        with self.lock:
            self.outcome_events += 1
            if self.outcome_events % EVERY:
                return [message]
            if self.fault == "misroute" and message["op"] != "completed":
                return [message]
            self.counts[f"injected:{self.fault}"] += 1
        if self.fault == "drop":
            return []
        if self.fault == "duplicate":
            return [message, dict(message)]
        if self.fault == "late_progress":
            late = {"task": message["task"], "page": message["page"], "progress": {"step": "0"}}
            return [message, {"op": "progress", **late}]
        results = dict(message.get("results") or {})
        results["token"] = "someone-else"
        return [dict(message, results=results)]


class Relay:
    """A Unix socket that forwards each connection to ``upstream`` through a Tamperer."""

    def __init__(self, upstream: str, tamper: Tamperer) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.directory = tempfile.mkdtemp(prefix="pbtchaos-relay-", dir="/tmp")
        self.path = os.path.join(self.directory, "relay.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.closing = False
        self.open: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="chaos-relay", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return  # closed
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                up.connect(self.upstream)
            except OSError:
                down.close()
                up.close()
                continue
            self.open |= {down, up}
            self._start(self._bytes_up, down, up)
            self._start(self._frames_down, up, down)

    def _bytes_up(self, down: socket.socket, up: socket.socket) -> None:
        """Client -> broker: bytes as they come."""
        try:
            while data := down.recv(1 << 16):
                up.sendall(data)
        except OSError:
            pass
        finally:
            self._hang_up(down, up)

    def _frames_down(self, up: socket.socket, down: socket.socket) -> None:
        """Broker -> client: frame by frame, through the tamperer."""
        try:
            while (header := _read_exact(up, _HEADER.size)) is not None:
                body = _read_exact(up, _HEADER.unpack(header)[0])
                if body is None:
                    break
                for message in self.tamper(msgpack.unpackb(body, raw=False)):
                    down.sendall(_frame(message))
        except OSError:
            pass
        finally:
            self._hang_up(down, up)

    def _hang_up(self, *socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._hang_up(self.listener)  # wakes the accept() (closing alone may not)
        self.threads[0].join(5)
        self.listener.close()
        for sock in list(self.open):
            self._hang_up(sock)
        for thread in self.threads:
            thread.join(5)
        for sock in self.open:
            sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


@contextlib.contextmanager
def relay(upstream: str, fault: str) -> Iterator[Relay]:
    """A tampering relay to ``upstream`` for the duration of the block."""
    tamperer = Tamperer(fault)
    running = Relay(upstream, tamperer)
    try:
        yield running
    finally:
        running.close()
