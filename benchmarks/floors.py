"""The transport floors: what two processes pay to pass our messages, with nothing else.

- pipe floor: msgpack ping-pong over two ``os.pipe`` between two processes (the
  broker <-> worker path), carrying a message shaped like our ``run``;
- socket floor: msgpack echo over a Unix socket, an asyncio ``Protocol`` server in another
  process and 4-byte length-prefixed frames (the client <-> broker path), carrying a
  message shaped like our ``enqueue``.

Only the benchmark's own framing is used here: a floor must not depend on the code it is
the floor of.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Final

import msgpack

from benchmarks.cells import FORK, die_with_parent
from benchmarks.framing import frame, take_frames, write_all
from benchmarks.load import WINDOW, Call, throughput_clients
from benchmarks.timing import BenchError, Metrics, stats_us, time_calls

_NOOP_ID: Final = 9001  # the size and shape of a no-op's messages (benchmarks/codeunits.py)
ENQUEUE_LIKE: Final = {
    "op": "enqueue",
    "page": 1,
    "codeunit": _NOOP_ID,
    "parameters": {},
    "timeout": None,
    "level": "Error",
}
RUN_LIKE: Final = {
    "op": "run",
    "job": 1,
    "codeunit": _NOOP_ID,
    "parameters": {},
    "task": 1,
    "session": 1,
    "record": "r",
    "timeout": 120_000,
}


# --- the pipe floor --------------------------------------------------------------------


def _pipe_echo(job_r: int, res_w: int, close: tuple[int, ...]) -> None:
    die_with_parent()
    for fd in close:
        os.close(fd)
    unpacker = msgpack.Unpacker(raw=False)
    packer = msgpack.Packer()
    while data := os.read(job_r, 1 << 16):
        unpacker.feed(data)
        for message in unpacker:
            write_all(res_w, packer.pack(message))


@contextlib.contextmanager
def _pipe_pair() -> Iterator[tuple[int, int]]:
    """An echo child on two pipes; yields (write end, read end) on our side."""
    job_r, job_w = os.pipe()
    res_r, res_w = os.pipe()
    child = FORK.Process(target=_pipe_echo, args=(job_r, res_w, (job_w, res_r)), daemon=True)
    child.start()
    os.close(job_r)
    os.close(res_w)
    try:
        yield job_w, res_r
    finally:
        os.close(job_w)  # EOF: the child returns
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
        os.close(res_r)


def latency_pipe(n: int, warmup: int) -> Metrics:
    packer = msgpack.Packer()
    unpacker = msgpack.Unpacker(raw=False)
    with _pipe_pair() as (job_w, res_r):

        def call() -> None:
            write_all(job_w, packer.pack(RUN_LIKE))
            while True:
                for _ in unpacker:
                    return
                unpacker.feed(os.read(res_r, 1 << 16))

        return stats_us(time_calls(call, n, warmup))


def throughput_pipe(total: int, warmup: int) -> Metrics:
    """One pair, ``WINDOW`` messages in flight."""
    packer = msgpack.Packer()
    unpacker = msgpack.Unpacker(raw=False)
    message = packer.pack(RUN_LIKE)
    with _pipe_pair() as (job_w, res_r):

        def run(n: int) -> None:
            sent = received = 0
            while sent < min(WINDOW, n):
                write_all(job_w, message)
                sent += 1
            while received < n:
                unpacker.feed(os.read(res_r, 1 << 16))
                for _ in unpacker:
                    received += 1
                    if sent < n:
                        write_all(job_w, message)
                        sent += 1

        run(warmup)
        t0 = time.monotonic()
        run(total)
        t1 = time.monotonic()
    return {"tasks_per_s": total / (t1 - t0), "tasks": total, "seconds": t1 - t0}


# --- the socket floor ------------------------------------------------------------------


class _EchoServer(asyncio.Protocol):
    """Unpack each length-prefixed frame, pack it back."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        for message in take_frames(self.buffer):
            self.transport.write(frame(message))


def _echo_server_main(path: str, ready_w: int) -> None:
    die_with_parent()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(_EchoServer, path, backlog=1024)
        os.write(ready_w, b"+")
        os.close(ready_w)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def _echo_server() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="pbt-bench-echo-", dir="/tmp")
    path = os.path.join(directory, "echo.sock")
    ready_r, ready_w = os.pipe()
    server = FORK.Process(target=_echo_server_main, args=(path, ready_w), daemon=True)
    server.start()
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"+":
            raise BenchError("the echo server did not start")
        yield path
    finally:
        os.close(ready_r)
        server.kill()
        server.join()
        shutil.rmtree(directory, ignore_errors=True)


def latency_socket(n: int, warmup: int) -> Metrics:
    with _echo_server() as path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        buffer = bytearray()
        rid = 0

        def call() -> None:
            nonlocal rid
            rid += 1
            sock.sendall(frame({**ENQUEUE_LIKE, "rid": rid}))
            while not take_frames(buffer):
                buffer.extend(sock.recv(1 << 16))

        return stats_us(time_calls(call, n, warmup))


class _EchoClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.rid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for message in take_frames(self.buffer):
            self.waiting.pop(message["rid"]).set_result(message)

    async def call(self) -> None:
        assert self.transport is not None
        self.rid += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.rid] = future
        self.transport.write(frame({**ENQUEUE_LIKE, "rid": self.rid}))
        await future


async def _open_echo(address: str) -> tuple[Call, Call]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_unix_connection(_EchoClient, address)

    async def close() -> None:
        transport.close()

    return client.call, close


def throughput_socket(sessions: int, total: int) -> Metrics:
    with _echo_server() as path:
        return throughput_clients(_open_echo, path, sessions, total)
