#!/usr/bin/env python3
"""Benchmark pbt-server against ready-made process pools, side by side, in one run.

::

    .venv/bin/python scripts/bench.py               # 5 runs; writes benchmarks/results + README
    .venv/bin/python scripts/bench.py --quick       # smoke test, tiny counts (< 60 s); prints only
    .venv/bin/python scripts/bench.py --only latency,timeout --runs 3 --out /tmp/b

Run from anywhere; brokers start with the repository root as their working directory.

Method: ``for run in range(N): for figure in figures: for system in figure (order rotated per
run): measure``, so drift (thermal, noisy neighbours) hits every system alike. Each
measurement runs in a freshly forked process of its own process group (pools, client
processes and echo servers start inside it and die with it); brokers run as
``python -m pbt_server run --daemon --config <ini>`` in their own sessions. A figure is the
median over runs of each run's statistic, with the min and max over runs. Ratios for the
targets are taken run by run (our figure of run i over the baseline's of run i), then the
median. Everything started here is stopped on exit, also on Ctrl-C, SIGTERM or an error.

Figures (no-op codeunit unless said; see ``--help`` and benchmarks/README.md):

- ``latency``: sequential submit -> result, one session / one caller, p50 and p99;
- ``throughput``: 1, 5, 50 sessions (separate client processes, WINDOW tasks in flight
  each) vs the pools' submit-all-then-await;
- ``timeout``: spinning task, timeout 200 ms: error arrival - enqueue reply - 200 ms
  (pebble: TimeoutError - submit - 200 ms);
- ``cancel``: MaxConcurrency 1: cancel() of a running task -> the waiting task of the same
  session completes, minus a no-op round trip;
- ``kill``: Count 1: SIGKILL a busy worker -> crash error -> a no-op completes;
- ``scale``: enqueue cost with 10, 10^3, 10^5 tasks waiting behind a busy worker;
- ``rss``: broker RSS with 1,000 idle sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks.codeunits (the broker imports it from cwd too)

import msgpack  # noqa: E402
import pebble  # noqa: E402
import psutil  # noqa: E402

import pbt_server  # noqa: E402
from benchmarks.codeunits import NOOP, SLEEP, SPIN  # noqa: E402
from pbt_server.client import Page, Session, aio, connect  # noqa: E402
from pbt_server.protocol import PROTOCOL_VERSION  # noqa: E402

FIGURES: Final = ("latency", "throughput", "timeout", "cancel", "kill", "scale", "rss")
SESSION_COUNTS: Final = (1, 5, 50)
WINDOW: Final = 8  # tasks in flight per client session in the throughput figure
TIMEOUT_MS: Final = 200
POOL_WORKERS: Final = 2
PEBBLE_TIMEOUT: Final = 10.0  # seconds: "pebble with a timeout" (its watchdog is then active)
FORK: Final = multiprocessing.get_context("fork")

_HEADER: Final = struct.Struct(">I")
_LIMITS: Final = {"max_bin_len": 0, "max_ext_len": 0, "max_array_len": 64, "max_map_len": 64}
_PR_SET_PDEATHSIG: Final = 1
# What the floors carry: the size and shape of our own enqueue request and "run" message.
_ENQUEUE_LIKE: Final = {
    "op": "enqueue",
    "page": 1,
    "codeunit": NOOP,
    "parameters": {},
    "timeout": None,
    "level": "Error",
}
_RUN_LIKE: Final = {
    "op": "run",
    "job": 1,
    "codeunit": NOOP,
    "parameters": {},
    "task": 1,
    "session": 1,
    "record": "r",
    "timeout": 120_000,
}

Metrics = dict[str, Any]  # metric name -> float (or a list of raw samples, "samples_*")


class BenchError(RuntimeError):
    pass


# --- parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    latency_n: int = 2000
    latency_warmup: int = 200
    throughput_tasks: int = 10_000  # per measurement, split over the sessions
    pool_warmup: int = 200
    timeout_n: int = 20
    cancel_n: int = 30
    kill_n: int = 30
    noop_rtt_n: int = 200  # no-op round trips measured for the cancel figure's subtraction
    scale_depths: tuple[int, ...] = (10, 1_000, 100_000)
    scale_batch: int = 1_000  # enqueues in flight at once, per depth
    scale_sequential: int = 200  # enqueues one after the other, per depth
    rss_sessions: int = 1_000

    @classmethod
    def quick(cls) -> Params:
        return cls(
            latency_n=200,
            latency_warmup=20,
            throughput_tasks=600,
            pool_warmup=20,
            timeout_n=3,
            cancel_n=3,
            kill_n=3,
            noop_rtt_n=30,
            scale_depths=(10, 1_000, 5_000),
            scale_batch=200,
            scale_sequential=20,
            rss_sessions=100,
        )


# --- small helpers -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Linux: get ``signum`` when the process that forked us ends (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _frame(message: Mapping[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _take_frames(buffer: bytearray) -> list[dict[str, Any]]:
    """Remove every complete length-prefixed frame from the front of ``buffer``; unpack each."""
    messages = []
    offset = 0
    size = len(buffer)
    while size - offset >= _HEADER.size:
        (length,) = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER.size + length
        if size < end:
            break
        with memoryview(buffer) as view, view[offset + _HEADER.size : end] as body:
            messages.append(msgpack.unpackb(body, raw=False, strict_map_key=True, **_LIMITS))
        offset = end
    if offset:
        del buffer[:offset]
    return messages


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _wait_for(what: str, check: Callable[[], Any], limit: float = 10.0) -> Any:
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.002)


# --- brokers -------------------------------------------------------------------------------

BROKER_BASE: Final[dict[str, dict[str, str]]] = {
    "Workers": {"Count": "2"},
    "Server": {"LogLevel": "INFO"},
    "Codeunits": {"Modules": "benchmarks.codeunits"},
}
BROKER_CONFIGS: Final[dict[str, dict[str, dict[str, str]]]] = {
    "default": {},
    "cancel": {"AsynchronousProcessing": {"ChildSessionsMaxConcurrency": "1"}},
    "kill": {"Workers": {"Count": "1"}},
    "scale": {
        "Workers": {"Count": "1"},
        "AsynchronousProcessing": {
            "ChildSessionsMaxConcurrency": "1",
            "ChildSessionsMaxQueueLength": "200000",
        },
    },
}


def _merge(*layers: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)
    return merged


@dataclass
class BrokerProcess:
    name: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return str(self.directory / "pbt.sock")

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, name: str, root: Path) -> BrokerProcess:
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        with sqlite3.connect(directory / "bench.db") as db:
            db.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT)")
        db.close()
        own = {
            "Server": {
                "SocketPath": str(directory / "pbt.sock"),
                "PidFile": str(directory / "pbt.pid"),
                "LogFile": str(directory / "pbt.log"),
            },
            "Database": {"Url": f"sqlite:///{directory}/bench.db"},
        }
        settings = _merge(BROKER_BASE, own, BROKER_CONFIGS[name])
        lines = []
        for section, keys in settings.items():
            lines += [f"[{section}]", *(f"{key} = {value}" for key, value in keys.items())]
        ini = directory / "server.ini"
        ini.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
        with open(directory / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "pbt_server", "run", "--daemon", "--config", str(ini)],
                cwd=REPO,  # the working directory is importable: benchmarks.codeunits
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(signal.SIGTERM),
            )
        broker = cls(name, directory, process)
        try:
            _wait_for(f"broker {name!r} to accept connections", broker._ready, 30)
        except BaseException:
            broker.stop()
            raise
        return broker

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"broker {self.name!r} exited: {self.log_tail()}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(self.socket)
                sock.sendall(_frame({"op": "hello", "rid": 1, "protocol": PROTOCOL_VERSION}))
                buffer = bytearray()
                while not (frames := _take_frames(buffer)):
                    data = sock.recv(4096)
                    if not data:
                        return False
                    buffer += data
                return bool(frames[0].get("op") == "reply")
        except OSError:
            return False

    def log_tail(self) -> str:
        text = ""
        for name in ("pbt.log", "stderr.txt"):
            with contextlib.suppress(OSError):
                text += (self.directory / name).read_text()[-3000:]
        return text

    def stop(self) -> None:
        """SIGTERM and wait (graceful); SIGKILL the group and any worker left if that fails."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _killpg(self.pid)
                self.process.wait()
        _killpg(self.pid)
        for child in children:  # workers run in their own process groups
            with contextlib.suppress(psutil.Error):
                child.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- measuring processes ("cells") ------------------------------------------------------


def _cell_main(conn: Connection, function: Callable[..., Metrics], kwargs: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the parent does it too: no window where a kill misses our children
    _die_with_parent()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    try:
        result = function(**kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", result))
    conn.close()


class Cells:
    """Runs each measurement in a forked process with its own process group."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def run(
        self, function: Callable[..., Metrics], kwargs: dict[str, Any], limit: float
    ) -> Metrics:
        reader, writer = FORK.Pipe(duplex=False)
        process = FORK.Process(
            target=_cell_main, args=(writer, function, kwargs), name="bench-cell", daemon=False
        )
        process.start()
        writer.close()
        pid = process.pid
        assert pid is not None
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self.live.add(pid)
        try:
            if not reader.poll(limit):
                raise BenchError(f"{function.__name__}: no result within {limit:.0f} s")
            try:
                status, payload = reader.recv()
            except EOFError:
                process.join(5)
                raise BenchError(
                    f"{function.__name__}: measuring process died ({process.exitcode})"
                ) from None
        finally:
            reader.close()
            process.join(10)
            _killpg(pid)  # whatever it left: pool workers, client processes, echo servers
            if process.is_alive():
                process.kill()
                process.join()
            self.live.discard(pid)
        if status != "ok":
            raise BenchError(f"{function.__name__} failed:\n{payload}")
        result: Metrics = payload
        return result

    def kill_all(self) -> None:
        for pid in list(self.live):
            _killpg(pid)
        self.live.clear()


# --- pbt-server helpers (inside cells) ----------------------------------------------------


def _workers(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slot workers (not the standby spare)."""
    return [w for w in status["workers"] if w["slot"] != "standby"]


def _all_idle(status: Mapping[str, Any], count: int) -> bool:
    """``count`` slot workers idle, and the standby spare booted (steady state)."""
    workers = _workers(status)
    standby = [w for w in status["workers"] if w["slot"] == "standby"]
    return (
        len(workers) == count
        and all(w["state"] == "idle" for w in workers)
        and [w["state"] for w in standby] == ["idle"]
    )


def _wait_idle(session: Session, count: int) -> None:
    _wait_for("idle workers", lambda: _all_idle(session.status(), count))


class Marker:
    """File names for the SLEEP codeunit's "I am running" file (see benchmarks/codeunits.py)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pbt-bench-mark-", dir="/tmp")
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return os.path.join(self.directory, f"started-{self.count}")

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_started(path: str) -> int:
    """Wait until the SLEEP task that got ``path`` runs; return its worker's pid."""

    def read() -> int | None:
        try:
            with open(path) as f:
                return int(f.read())
        except FileNotFoundError:
            return None

    pid: int = _wait_for(f"the task of {path} to run", read)
    return pid


def _open_page(session: Session) -> Page:
    return session.open_page("Bench", "Bench: 1")


# --- latency ---------------------------------------------------------------------------------


def _stats_us(samples: Sequence[float]) -> Metrics:
    us = [s * 1e6 for s in samples]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "n": len(us)}


def latency_pbt_sync(socket_path: str, n: int, warmup: int) -> Metrics:
    samples = []
    with connect(socket_path) as session:
        page = _open_page(session)
        for _ in range(warmup):
            page.enqueue_background_task(NOOP).result()
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            page.enqueue_background_task(NOOP).result()
            samples.append(clock() - t0)
    return _stats_us(samples)


def latency_pbt_aio(socket_path: str, n: int, warmup: int) -> Metrics:
    async def main() -> list[float]:
        samples = []
        session = await aio.connect(socket_path)
        try:
            page = await session.open_page("Bench", "Bench: 1")
            for _ in range(warmup):
                await (await page.enqueue_background_task(NOOP)).result()
            clock = time.perf_counter
            for _ in range(n):
                t0 = clock()
                await (await page.enqueue_background_task(NOOP)).result()
                samples.append(clock() - t0)
        finally:
            await session.close()
        return samples

    return _stats_us(asyncio.run(main()))


def _noop(x: int) -> int:
    return x


def _spin() -> None:
    x = 0
    while True:
        x += 1


Submit = Callable[[], Callable[[], object]]  # submit a no-op; returns "wait for its result"


@contextlib.contextmanager
def _pool(kind: str) -> Iterator[Submit]:
    if kind == "ppe":
        with ProcessPoolExecutor(POOL_WORKERS, mp_context=FORK) as executor:
            yield lambda: executor.submit(_noop, 0).result
    elif kind == "pebble":
        pool = pebble.ProcessPool(max_workers=POOL_WORKERS, context=FORK)
        try:
            yield lambda: pool.schedule(_noop, args=(0,), timeout=PEBBLE_TIMEOUT).result
        finally:
            pool.close()
            pool.join()
    elif kind == "mp-pool":
        with FORK.Pool(POOL_WORKERS) as mp_pool:
            yield lambda: mp_pool.apply_async(_noop, (0,)).get
    else:
        raise ValueError(kind)


def latency_pool(kind: str, n: int, warmup: int) -> Metrics:
    samples = []
    with _pool(kind) as submit:
        for _ in range(warmup):
            submit()()
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            submit()()
            samples.append(clock() - t0)
    return _stats_us(samples)


def _pipe_echo(job_r: int, res_w: int, close: tuple[int, ...]) -> None:
    _die_with_parent()
    for fd in close:
        os.close(fd)
    unpacker = msgpack.Unpacker(raw=False)
    packer = msgpack.Packer()
    while data := os.read(job_r, 1 << 16):
        unpacker.feed(data)
        for message in unpacker:
            _write_all(res_w, packer.pack(message))


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
    samples = []
    packer = msgpack.Packer()
    unpacker = msgpack.Unpacker(raw=False)
    with _pipe_pair() as (job_w, res_r):

        def call() -> None:
            _write_all(job_w, packer.pack(_RUN_LIKE))
            while True:
                for _ in unpacker:
                    return
                unpacker.feed(os.read(res_r, 1 << 16))

        for _ in range(warmup):
            call()
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            call()
            samples.append(clock() - t0)
    return _stats_us(samples)


class _EchoServer(asyncio.Protocol):
    """The socket floor: unpack each length-prefixed frame, pack it back."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        assert self.transport is not None
        for message in _take_frames(self.buffer):
            self.transport.write(_frame(message))


def _echo_server_main(path: str, ready_w: int) -> None:
    _die_with_parent()

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
    samples = []
    with _echo_server() as path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        buffer = bytearray()
        rid = 0

        def call() -> None:
            nonlocal rid
            rid += 1
            sock.sendall(_frame({**_ENQUEUE_LIKE, "rid": rid}))
            while not _take_frames(buffer):
                buffer.extend(sock.recv(1 << 16))

        for _ in range(warmup):
            call()
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            call()
            samples.append(clock() - t0)
    return _stats_us(samples)


# --- throughput ------------------------------------------------------------------------------


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
        for message in _take_frames(self.buffer):
            self.waiting.pop(message["rid"]).set_result(message)

    async def call(self) -> None:
        assert self.transport is not None
        self.rid += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.rid] = future
        self.transport.write(_frame({**_ENQUEUE_LIKE, "rid": self.rid}))
        await future


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _client_main(kind: str, address: str, count: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    closer: Callable[[], Any]
    if kind == "pbt":
        session = await aio.connect(address)
        page = await session.open_page("Bench", "Bench: 1")

        async def one() -> None:
            await (await page.enqueue_background_task(NOOP)).result()

        closer = session.close
    else:
        transport, client = await loop.create_unix_connection(_EchoClient, address)
        one = client.call

        async def close_echo() -> None:
            transport.close()

        closer = close_echo

    async def lane(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(5):  # warm-up: connection, page, code paths
        await one()
    conn.send("ready")
    conn.recv()  # "go": blocks the loop on purpose, nothing else is due
    t0 = time.monotonic()
    await asyncio.gather(*(lane(n) for n in _split(count, WINDOW) if n))
    t1 = time.monotonic()
    await closer()
    conn.send((t0, t1, count))


def _client_process(kind: str, address: str, count: int, conn: Connection) -> None:
    _die_with_parent()
    asyncio.run(_client_main(kind, address, count, conn))


def throughput_clients(kind: str, address: str, sessions: int, total: int) -> Metrics:
    """``sessions`` client processes, each ``WINDOW`` tasks in flight; tasks/s overall."""
    procs, conns = [], []
    try:
        for count in _split(total, sessions):
            ours, theirs = FORK.Pipe()
            proc = FORK.Process(
                target=_client_process, args=(kind, address, count, theirs), daemon=True
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        for conn in conns:
            if not conn.poll(60) or conn.recv() != "ready":
                raise BenchError("a client process did not get ready")
        for conn in conns:
            conn.send("go")
        spans = []
        for conn in conns:
            if not conn.poll(600):
                raise BenchError("a client process did not finish")
            spans.append(conn.recv())
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    start = min(s[0] for s in spans)
    end = max(s[1] for s in spans)
    done = sum(s[2] for s in spans)
    return {"tasks_per_s": done / (end - start), "tasks": done, "seconds": end - start}


def throughput_pbt(socket_path: str, sessions: int, total: int) -> Metrics:
    return throughput_clients("pbt", socket_path, sessions, total)


def throughput_socket(sessions: int, total: int) -> Metrics:
    with _echo_server() as path:
        return throughput_clients("echo", path, sessions, total)


def throughput_pool(kind: str, total: int, warmup: int) -> Metrics:
    with _pool(kind) as submit:
        for _ in range(warmup):
            submit()()
        t0 = time.monotonic()
        waits = [submit() for _ in range(total)]
        for wait in waits:
            wait()
        t1 = time.monotonic()
    return {"tasks_per_s": total / (t1 - t0), "tasks": total, "seconds": t1 - t0}


def throughput_pipe(total: int, warmup: int) -> Metrics:
    packer = msgpack.Packer()
    unpacker = msgpack.Unpacker(raw=False)
    message = packer.pack(_RUN_LIKE)
    with _pipe_pair() as (job_w, res_r):

        def run(n: int) -> None:
            sent = received = 0
            while sent < min(WINDOW, n):
                _write_all(job_w, message)
                sent += 1
            while received < n:
                unpacker.feed(os.read(res_r, 1 << 16))
                for _ in unpacker:
                    received += 1
                    if sent < n:
                        _write_all(job_w, message)
                        sent += 1

        run(warmup)
        t0 = time.monotonic()
        run(total)
        t1 = time.monotonic()
    return {"tasks_per_s": total / (t1 - t0), "tasks": total, "seconds": t1 - t0}


# --- timeout precision -----------------------------------------------------------------------


def _stats_ms(prefix: str, samples_s: Sequence[float]) -> Metrics:
    ms = [s * 1e3 for s in samples_s]
    return {
        f"{prefix}p50_ms": percentile(ms, 50),
        f"{prefix}p99_ms": percentile(ms, 99),
        f"{prefix}max_ms": max(ms),
        f"samples_{prefix}ms": [round(v, 4) for v in ms],
    }


def timeout_pbt(socket_path: str, n: int) -> Metrics:
    """Error arrival - enqueue reply arrival - 200 ms (the worker's ack is not visible)."""
    samples = []
    with connect(socket_path) as session:
        page = _open_page(session)
        for _ in range(n):
            _wait_idle(session, 2)
            task = page.enqueue_background_task(SPIN, timeout=TIMEOUT_MS)
            replied = time.perf_counter()
            error = task.exception(timeout=10)
            arrived = time.perf_counter()
            if error is None or getattr(error, "code", "") != "ChildSessionTaskTimeout":
                raise BenchError(f"expected ChildSessionTaskTimeout, got {error!r}")
            samples.append(arrived - replied - TIMEOUT_MS / 1000)
        _wait_idle(session, 2)
    return _stats_ms("", samples)


def timeout_pebble(n: int) -> Metrics:
    """TimeoutError raised - submit - 200 ms, with pebble's own timeout."""
    samples = []
    pool = pebble.ProcessPool(max_workers=POOL_WORKERS, context=FORK)
    try:
        for _ in range(n):
            pool.schedule(_noop, args=(0,)).result()  # a live worker is waiting
            time.sleep(0.05)
            submitted = time.perf_counter()
            future = pool.schedule(_spin, timeout=TIMEOUT_MS / 1000)
            try:
                future.result(timeout=10)
            except TimeoutError:
                raised = time.perf_counter()
            else:
                raise BenchError("pebble: the spinning task returned")
            samples.append(raised - submitted - TIMEOUT_MS / 1000)
    finally:
        pool.stop()
        pool.join()
    return _stats_ms("", samples)


# --- cancel -> slot free -----------------------------------------------------------------------


def cancel_pbt(socket_path: str, n: int, rtt_n: int) -> Metrics:
    """MaxConcurrency 1: cancel A (running) -> B (waiting, same session) completes."""
    with connect(socket_path) as session:
        page = _open_page(session)
        _wait_idle(session, 2)
        for _ in range(20):
            page.enqueue_background_task(NOOP).result()
        rtts = []
        for _ in range(rtt_n):
            t0 = time.perf_counter()
            page.enqueue_background_task(NOOP).result()
            rtts.append(time.perf_counter() - t0)
        rtt = percentile(rtts, 50)
        totals, calls = [], []
        marker = Marker()
        for _ in range(n):
            _wait_idle(session, 2)
            started = marker.next()
            running = page.enqueue_background_task(SLEEP, {"seconds": "30", "started": started})
            waiting = page.enqueue_background_task(NOOP)
            _wait_started(started)
            t0 = time.perf_counter()
            if not running.cancel():
                raise BenchError("cancel() returned False")
            t1 = time.perf_counter()
            waiting.result(timeout=10)
            t2 = time.perf_counter()
            totals.append(t2 - t0)
            calls.append(t1 - t0)
        _wait_idle(session, 2)
        marker.close()
    metrics = _stats_ms("", [t - rtt for t in totals])
    metrics |= {
        "raw_p50_ms": percentile(totals, 50) * 1e3,
        "cancel_call_p50_ms": percentile(calls, 50) * 1e3,
        "noop_rtt_ms": rtt * 1e3,
    }
    return metrics


# --- kill + replace ----------------------------------------------------------------------------


def kill_pbt(socket_path: str, n: int) -> Metrics:
    """Count 1: SIGKILL the busy worker; crash error; then a no-op on its replacement."""
    to_error, to_noop, totals = [], [], []
    with connect(socket_path) as session:
        page = _open_page(session)
        _wait_idle(session, 1)
        for _ in range(20):
            page.enqueue_background_task(NOOP).result()
        marker = Marker()
        for _ in range(n):
            _wait_idle(session, 1)
            started = marker.next()
            task = page.enqueue_background_task(SLEEP, {"seconds": "30", "started": started})
            pid = _wait_started(started)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            error = task.exception(timeout=10)
            t1 = time.perf_counter()
            if error is None or getattr(error, "code", "") != "ChildSessionCrashed":
                raise BenchError(f"expected ChildSessionCrashed, got {error!r}")
            page.enqueue_background_task(NOOP).result(timeout=10)
            t2 = time.perf_counter()
            to_error.append(t1 - t0)
            to_noop.append(t2 - t1)
            totals.append(t2 - t0)
        _wait_idle(session, 1)
        marker.close()
    return _stats_ms("", totals) | _stats_ms("error_", to_error) | _stats_ms("noop_", to_noop)


# --- scale ------------------------------------------------------------------------------------


def scale_pbt(socket_path: str, depths: Sequence[int], batch: int, sequential: int) -> Metrics:
    """Enqueue cost with ``depth`` tasks waiting (Count 1 busy, MaxConcurrency 1)."""

    async def main() -> Metrics:
        metrics: Metrics = {}
        session = await aio.connect(socket_path)
        page = await session.open_page("Bench", "Bench: 1")

        async def enqueue(k: int) -> None:
            await asyncio.gather(*(page.enqueue_background_task(NOOP) for _ in range(k)))

        marker = Marker()
        started = marker.next()
        parameters = {"seconds": "3600", "started": started}
        await page.enqueue_background_task(SLEEP, parameters, timeout=600_000)
        _wait_started(started)  # blocks the loop briefly: nothing else is due yet
        marker.close()
        waiting = 0
        clock = time.perf_counter
        for depth in depths:
            while waiting < depth:
                k = min(1000, depth - waiting)
                await enqueue(k)
                waiting += k
            # The figure is the broker's: keep this process's own gen-2 collections over
            # 10^5 task handles (up to ~0.5 s each) out of it. Reported in the README.
            gc.collect()
            gc.freeze()
            one_by_one = []
            for _ in range(sequential):
                t0 = clock()
                await page.enqueue_background_task(NOOP)
                one_by_one.append(clock() - t0)
            t0 = clock()
            await enqueue(batch)
            elapsed = clock() - t0
            waiting += sequential + batch
            metrics[f"batch_us@{depth}"] = elapsed / batch * 1e6
            metrics[f"seq_p50_us@{depth}"] = percentile(one_by_one, 50) * 1e6
        # How long the broker is busy when a session with that many waiting tasks closes.
        t0 = clock()
        await session.close()
        probe = await aio.connect(socket_path, timeout=120)
        await probe.ping()
        metrics["close_ms"] = (clock() - t0) * 1e3
        metrics["waiting_at_close"] = waiting
        await probe.close()
        return metrics

    return asyncio.run(main())


# --- rss ----------------------------------------------------------------------------------------


def rss_pbt(socket_path: str, broker_pid: int, sessions: int) -> Metrics:
    async def main() -> Metrics:
        broker = psutil.Process(broker_pid)
        before = broker.memory_info().rss
        opened: list[aio.Session] = []
        try:
            while len(opened) < sessions:
                k = min(100, sessions - len(opened))
                opened += await asyncio.gather(*(aio.connect(socket_path) for _ in range(k)))
            await opened[0].ping()
            after = broker.memory_info().rss
        finally:
            await asyncio.gather(*(s.close() for s in opened))
        return {
            "sessions": len(opened),
            "rss_idle_mb": before / 2**20,
            "rss_sessions_mb": after / 2**20,
            "per_session_kb": (after - before) / len(opened) / 1024,
        }

    return asyncio.run(main())


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    figure: str
    system: str
    function: Callable[..., Metrics]
    kwargs: dict[str, Any] = field(default_factory=dict)
    broker: str | None = None  # a BROKER_CONFIGS name; its socket path is passed in
    fresh_broker: bool = False  # start one for this measurement only
    broker_pid: bool = False  # also pass the broker's pid
    limit: float = 300.0


LABELS: Final[dict[str, str]] = {
    "pbt-sync": "pbt-server, sync client",
    "pbt-aio": "pbt-server, asyncio client",
    "pbt": "pbt-server",
    "ppe": "ProcessPoolExecutor(2, fork)",
    "pebble": f"pebble.ProcessPool(2), timeout={PEBBLE_TIMEOUT:.0f} s",
    "pebble-timeout": "pebble.ProcessPool(2), its own timeout",
    "mp-pool": "multiprocessing.Pool(2, fork)",
    "pipe-floor": "floor: msgpack over os.pipe (2 processes)",
    "socket-floor": "floor: msgpack echo, asyncio Unix socket",
}


def _label_for(system: str) -> str:
    base, _, sessions = system.partition("@")
    label = LABELS.get(base, base)
    if sessions:
        noun = "session" if sessions == "1" else "sessions"
        label += f", {sessions} {noun} x {WINDOW} in flight"
    return label


def plan(figure: str, p: Params) -> list[Measurement]:
    lat = {"n": p.latency_n, "warmup": p.latency_warmup}
    if figure == "latency":
        return [
            Measurement(figure, "pbt-sync", latency_pbt_sync, lat, broker="default"),
            Measurement(figure, "pbt-aio", latency_pbt_aio, lat, broker="default"),
            *(
                Measurement(figure, kind, latency_pool, {"kind": kind, **lat})
                for kind in ("ppe", "pebble", "mp-pool")
            ),
            Measurement(figure, "pipe-floor", latency_pipe, lat),
            Measurement(figure, "socket-floor", latency_socket, lat),
        ]
    if figure == "throughput":
        total = p.throughput_tasks
        found = []
        for sessions in SESSION_COUNTS:
            found += [
                Measurement(
                    figure,
                    f"pbt@{sessions}",
                    throughput_pbt,
                    {"sessions": sessions, "total": total},
                    broker="default",
                ),
                Measurement(
                    figure,
                    f"socket-floor@{sessions}",
                    throughput_socket,
                    {"sessions": sessions, "total": total},
                ),
            ]
        pool = {"total": total, "warmup": p.pool_warmup}
        found += [
            Measurement(figure, kind, throughput_pool, {"kind": kind, **pool})
            for kind in ("ppe", "pebble", "mp-pool")
        ]
        found.append(Measurement(figure, "pipe-floor", throughput_pipe, pool))
        return found
    if figure == "timeout":
        return [
            Measurement(figure, "pbt", timeout_pbt, {"n": p.timeout_n}, broker="default"),
            Measurement(figure, "pebble-timeout", timeout_pebble, {"n": p.timeout_n}),
        ]
    if figure == "cancel":
        kwargs: dict[str, Any] = {"n": p.cancel_n, "rtt_n": p.noop_rtt_n}
        return [Measurement(figure, "pbt", cancel_pbt, kwargs, broker="cancel")]
    if figure == "kill":
        return [Measurement(figure, "pbt", kill_pbt, {"n": p.kill_n}, broker="kill")]
    if figure == "scale":
        kwargs = {
            "depths": p.scale_depths,
            "batch": p.scale_batch,
            "sequential": p.scale_sequential,
        }
        return [
            Measurement(
                figure, "pbt", scale_pbt, kwargs, broker="scale", fresh_broker=True, limit=900
            )
        ]
    if figure == "rss":
        kwargs = {"sessions": p.rss_sessions}
        return [
            Measurement(
                figure, "pbt", rss_pbt, kwargs, broker="default", fresh_broker=True, broker_pid=True
            )
        ]
    raise ValueError(figure)


# --- running -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per figure, per system: one metrics map per run (None where the measurement failed)."""

    runs: int
    data: dict[str, dict[str, list[Metrics | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, figure: str, system: str, run: int, metrics: Metrics | None) -> None:
        slots = self.data.setdefault(figure, {}).setdefault(system, [None] * self.runs)
        slots[run] = metrics


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all processes, kernel included)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _tree_seconds(pid: int) -> float:
    """CPU seconds of a live process, its reaped descendants and its live descendants."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total
    except psutil.Error:
        return 0.0


class ForeignLoad:
    """How many cores *other* processes kept busy: machine busy time minus our own tree's.

    Ours: this process and everything it has reaped (cells, their pools and clients, stopped
    brokers), plus the live brokers and their workers. Approximate: a process of ours that
    was reaped by init (rare: a pool worker orphaned by a kill) counts as foreign.
    """

    def __init__(self, brokers: Callable[[], list[int]]) -> None:
        self.brokers = brokers
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        ours += sum(_tree_seconds(pid) for pid in self.brokers())
        return time.monotonic(), _busy_seconds(), ours

    def cores(self) -> float:
        """Foreign cores since the last call (or construction)."""
        end = self._sample()
        wall = end[0] - self._start[0]
        foreign = (end[1] - self._start[1]) - (end[2] - self._start[2])
        self._start = end
        return max(foreign, 0.0) / wall if wall > 0 else 0.0


class Bench:
    def __init__(self, params: Params, runs: int, figures: Sequence[str]) -> None:
        self.params = params
        self.runs = runs
        self.figures = figures
        self.root = Path(tempfile.mkdtemp(prefix="pbt-bench-", dir="/tmp"))
        self.brokers: dict[str, BrokerProcess] = {}
        self.cells = Cells()

    def broker(self, name: str) -> BrokerProcess:
        broker = self.brokers.get(name)
        if broker is None or broker.process.poll() is not None:
            if broker is not None:
                broker.stop()
            broker = self.brokers[name] = BrokerProcess.start(name, self.root)
        return broker

    def run(self) -> Outcome:
        outcome = Outcome(self.runs)
        for run in range(self.runs):
            for figure in self.figures:
                measurements = plan(figure, self.params)
                shift = run % len(measurements)  # rotate: no system is always first
                for m in measurements[shift:] + measurements[:shift]:
                    outcome.add(figure, m.system, run, self.measure(m, run, outcome))
        return outcome

    def measure(self, m: Measurement, run: int, outcome: Outcome) -> Metrics | None:
        kwargs = dict(m.kwargs)
        fresh: BrokerProcess | None = None
        started = time.monotonic()
        load = ForeignLoad(lambda: [b.pid for b in self.brokers.values()])
        try:
            if m.broker is not None:
                if m.fresh_broker:
                    fresh = BrokerProcess.start(m.broker, self.root)
                    broker = fresh
                    pid = fresh.pid
                    load = ForeignLoad(lambda: [pid, *(b.pid for b in self.brokers.values())])
                else:
                    broker = self.broker(m.broker)
                kwargs["socket_path"] = broker.socket
                if m.broker_pid:
                    kwargs["broker_pid"] = broker.pid
            metrics = self.cells.run(m.function, kwargs, m.limit)
            metrics["foreign_cores"] = load.cores()
        except BenchError as err:
            text = f"run {run + 1}, {m.figure}, {m.system}: {err}"
            outcome.errors.append(text)
            _progress(f"ERROR {text}")
            return None
        finally:
            if fresh is not None:
                fresh.stop()
        _progress(
            f"[run {run + 1}/{self.runs}] {m.figure:<10} {m.system:<16} "
            f"{_brief(metrics)}  ({time.monotonic() - started:.1f} s, "
            f"others {metrics['foreign_cores']:.2f} cores)"
        )
        return metrics

    def cleanup(self) -> None:
        self.cells.kill_all()
        for broker in self.brokers.values():
            broker.stop()
        self.brokers.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _brief(metrics: Metrics) -> str:
    shown = []
    for key, value in metrics.items():
        if isinstance(value, float) and key != "foreign_cores":
            shown.append(f"{key}={value:,.3g}" if abs(value) < 1000 else f"{key}={value:,.0f}")
    return " ".join(shown[:6])


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- summary, targets, report -----------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        values = [v for v in values if v == v]  # drop NaN
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))


def summarize(outcome: Outcome) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    summary: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for figure, systems in outcome.data.items():
        for system, runs in systems.items():
            keys = [k for m in runs if m for k, v in m.items() if isinstance(v, int | float)]
            for key in dict.fromkeys(keys):
                spread = Spread.of([m[key] for m in runs if m and key in m])
                if spread is not None:
                    summary.setdefault(figure, {}).setdefault(system, {})[key] = asdict(spread)
    return summary


@dataclass(frozen=True)
class Target:
    name: str
    measured: Spread
    unit: str
    limit: float
    upper: bool  # True: measured must be <= limit; False: >= limit
    detail: str = ""

    @property
    def met(self) -> bool:
        m = self.measured.median
        return m <= self.limit if self.upper else m >= self.limit


def _per_run(outcome: Outcome, figure: str, system: str, key: str) -> list[float | None]:
    runs = outcome.data.get(figure, {}).get(system, [])
    return [m.get(key) if m else None for m in runs]


def _ratio(
    outcome: Outcome, figure: str, ours: str, theirs: str, key: str
) -> tuple[Spread, str] | None:
    a = _per_run(outcome, figure, ours, key)
    b = _per_run(outcome, figure, theirs, key)
    ratios = [x / y for x, y in zip(a, b, strict=False) if x is not None and y]
    spread = Spread.of(ratios)
    if spread is None:
        return None
    ours_m = Spread.of([x for x in a if x is not None])
    theirs_m = Spread.of([y for y in b if y is not None])
    assert ours_m is not None
    assert theirs_m is not None
    return spread, f"{_num(ours_m.median)} vs {_num(theirs_m.median)}"


def targets(outcome: Outcome, params: Params) -> list[Target]:
    found: list[Target] = []

    def ratio_target(
        name: str, figure: str, ours: str, theirs: str, key: str, limit: float, upper: bool
    ) -> None:
        pair = _ratio(outcome, figure, ours, theirs, key)
        if pair is not None:
            unit = "µs" if key.endswith("_us") else "tasks/s"
            found.append(Target(name, pair[0], "x", limit, upper, f"{pair[1]} {unit}"))

    def plain_target(name: str, figure: str, key: str, limit: float, detail: str) -> None:
        spread = Spread.of([v for v in _per_run(outcome, figure, "pbt", key) if v is not None])
        if spread is not None:
            found.append(Target(name, spread, "ms", limit, True, detail))

    for system, client in (("pbt-sync", "sync"), ("pbt-aio", "asyncio")):
        ratio_target(
            f"no-op round trip p50 ({client} client) ≤ 0.5x ProcessPoolExecutor's",
            "latency",
            system,
            "ppe",
            "p50_us",
            0.5,
            True,
        )
    for sessions in SESSION_COUNTS:
        noun = "session" if sessions == 1 else "sessions"
        for pool, limit in (("ppe", 2.0), ("pebble", 1.2)):
            name = "ProcessPoolExecutor's" if pool == "ppe" else "pebble's"
            ratio_target(
                f"throughput, {sessions} {noun} ≥ {limit:g}x {name}",
                "throughput",
                f"pbt@{sessions}",
                pool,
                "tasks_per_s",
                limit,
                False,
            )
    plain_target(
        "timeout error p99 ≤ deadline + 20 ms",
        "timeout",
        "p99_ms",
        20.0,
        f"{params.timeout_n} timeouts per run; error ≈ arrival - enqueue reply - 200 ms",
    )
    plain_target(
        "cancel → slot free p50 ≤ 5 ms",
        "cancel",
        "p50_ms",
        5.0,
        f"{params.cancel_n} cancels per run; minus the median no-op round trip",
    )
    plain_target(
        "kill + replace p99 ≤ 5 ms",
        "kill",
        "p99_ms",
        5.0,
        f"{params.kill_n} kills per run; SIGKILL → crash error → a no-op completes",
    )
    top = params.scale_depths[-1]
    first = params.scale_depths[0]
    a = _per_run(outcome, "scale", "pbt", f"batch_us@{top}")
    b = _per_run(outcome, "scale", "pbt", f"batch_us@{first}")
    spread = Spread.of([x / y for x, y in zip(a, b, strict=False) if x is not None and y])
    if spread is not None:
        found.append(
            Target(
                f"enqueue cost at {top:,} waiting ≤ 1.5x at {first:,}",
                spread,
                "x",
                1.5,
                True,
                f"{params.scale_batch:,} enqueues in flight at each depth",
            )
        )
    return found


def _foreign(results: Mapping[str, Mapping[str, Sequence[Metrics | None]]]) -> str:
    values = [
        m["foreign_cores"]
        for systems in results.values()
        for runs in systems.values()
        for m in runs
        if m and "foreign_cores" in m
    ]
    spread = Spread.of(values)
    if spread is None:
        return "not measured"
    return (
        f"median {spread.median:.2f} cores ({spread.low:.2f}-{spread.high:.2f} over "
        f"{len(values)} measurements)"
    )


def _loadavg(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def _num(value: float) -> str:
    if value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(spread: Mapping[str, float] | None) -> str:
    if not spread:
        return "-"
    return f"{_num(spread['median'])} ({_num(spread['low'])}-{_num(spread['high'])})"


# (figure, title, columns: (metric key, header)), rows in plan order.
TABLES: Final[list[tuple[str, str, list[tuple[str, str]]]]] = [
    (
        "latency",
        "Sequential no-op round trip, one session / one caller (µs)",
        [("p50_us", "p50"), ("p99_us", "p99")],
    ),
    ("throughput", "Throughput, no-op tasks (tasks/s)", [("tasks_per_s", "tasks/s")]),
    (
        "timeout",
        f"Timeout precision: error arrival - deadline, timeout {TIMEOUT_MS} ms (ms)",
        [("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")],
    ),
    (
        "cancel",
        "Cancel → slot free (ms)",
        [
            ("p50_ms", "p50 - no-op RTT"),
            ("p99_ms", "p99 - no-op RTT"),
            ("raw_p50_ms", "p50 raw"),
            ("cancel_call_p50_ms", "cancel() call p50"),
            ("noop_rtt_ms", "no-op RTT p50"),
        ],
    ),
    (
        "kill",
        "Kill + replace, Count = 1 (ms)",
        [
            ("error_p50_ms", "kill → error p50"),
            ("error_p99_ms", "p99"),
            ("noop_p50_ms", "error → no-op done p50"),
            ("noop_p99_ms", "p99"),
            ("p50_ms", "total p50"),
            ("p99_ms", "total p99"),
        ],
    ),
]


QUICK_NOTE: Final = " **Quick (smoke test) counts: not comparable.**"


def render_markdown(report: Mapping[str, Any]) -> str:
    summary = report["summary"]
    machine = report["machine"]
    p = report["params"]
    lines = [
        f"Run of {report['started']} — {report['runs']} run(s), "
        f"median (min-max over runs).{QUICK_NOTE if report['quick'] else ''}",
        "",
        f"- Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs "
        f"({machine['logical_cpus']} logical, {machine['physical_cores']} physical), "
        f"{machine['memory_gb']} GB; {machine['os']}",
        f"- Python {machine['python']}; pbt-server {machine['pbt_server']} "
        f"(commit {machine['commit']}); msgpack {machine['msgpack']}, "
        f"pebble {machine['pebble']}, psutil {machine['psutil']}",
        f"- Load average (1, 5, 15 min) at start: {_loadavg(machine['loadavg'])}; "
        f"at the end: {_loadavg(report['loadavg_end'])}; duration {report['seconds']:.0f} s",
        f"- Command: `{report['command']}`",
        f"- Other processes' CPU during the measurements (machine busy time minus this "
        f"benchmark's own processes): {_foreign(report['results'])}",
        "",
    ]
    if report["targets"]:
        lines += [
            "### Targets",
            "",
            "| target | measured: median (min-max) | basis (medians) | status |",
            "|---|---|---|---|",
        ]
        for t in report["targets"]:
            measured = _cell(t["measured"]) + (f" {t['unit']}" if t["unit"] else "")
            status = "**met**" if t["met"] else "**MISSED**"
            lines.append(f"| {t['name']} | {measured} | {t['detail']} | {status} |")
        lines += [
            "",
            "Ratios are taken run by run against the baseline measured in the same run.",
            "",
        ]
    for figure, title, columns in TABLES:
        rows = summary.get(figure)
        if not rows:
            continue
        lines += [f"### {title}", "", "| system | " + " | ".join(h for _, h in columns) + " |"]
        lines.append("|---|" + "---|" * len(columns))
        for system, metrics in rows.items():
            cells = " | ".join(_cell(metrics.get(key)) for key, _ in columns)
            lines.append(f"| {_label_for(system)} | {cells} |")
        lines.append("")
    scale = summary.get("scale", {}).get("pbt")
    if scale:
        lines += [
            "### Scale: enqueue cost with tasks already waiting (µs per enqueue)",
            "",
            f"| waiting | {p['scale_batch']:,} enqueues in flight: cost each "
            f"| sequential enqueue round trip p50 |",
            "|---|---|---|",
        ]
        for depth in p["scale_depths"]:
            lines.append(
                f"| {depth:,} | {_cell(scale.get(f'batch_us@{depth}'))} "
                f"| {_cell(scale.get(f'seq_p50_us@{depth}'))} |"
            )
        lines += [
            "",
            f"Closing that session (≈ {_num(scale['waiting_at_close']['median'])} tasks "
            f"waiting) until a new session's ping is answered: "
            f"{_cell(scale.get('close_ms'))} ms.",
            "",
        ]
    rss = summary.get("rss", {}).get("pbt")
    if rss:
        lines += [
            "### Broker memory (RSS of the broker process, workers not included)",
            "",
            f"| idle, no session | {p['rss_sessions']:,} idle sessions | per session |",
            "|---|---|---|",
            f"| {_cell(rss.get('rss_idle_mb'))} MB | {_cell(rss.get('rss_sessions_mb'))} MB "
            f"| {_cell(rss.get('per_session_kb'))} KB |",
            "",
        ]
    if report["errors"]:
        lines += ["### Errors", "", *(f"- {e.splitlines()[0]}" for e in report["errors"]), ""]
    return "\n".join(lines)


README_BEGIN: Final = "<!-- bench:begin (generated by scripts/bench.py; do not edit) -->"
README_END: Final = "<!-- bench:end -->"
README_TEMPLATE: Final = f"""# Benchmarks

`scripts/bench.py` measures pbt-server and the ready-made pools it is meant to beat, side by
side, in one run on one machine, and writes the numbers to `results/<date>.json` and to the
section below.

```sh
.venv/bin/python scripts/bench.py             # full run (5 runs, several minutes)
.venv/bin/python scripts/bench.py --quick     # smoke test (< 60 s); prints, writes nothing
.venv/bin/python scripts/bench.py --only latency,timeout --runs 3 --out /tmp/bench
```

## Method

- **Interleaved**: `for run in range(N): for figure: for system: measure`, the order of the
  systems rotated each run, so drift hits all alike. Each figure is the median over the runs
  of that run's statistic, with the min and max over runs. Target ratios are computed run by
  run (pbt-server's figure over the baseline's figure *of the same run*), then the median.
- **Isolation**: each measurement runs in a freshly forked process with its own process group;
  the pools, client processes and echo servers it starts die with it. Brokers run as
  `python -m pbt_server run --daemon --config <ini>` (the same broker `pbt-server start`
  runs, logging only to its file) in their own sessions, with `Workers.Count = 2`,
  `LogLevel = INFO`, defaults otherwise, and the codeunits of `benchmarks/codeunits.py`.
- **Baselines**: `ProcessPoolExecutor(2)` and `multiprocessing.Pool(2)` with the fork
  context, `pebble.ProcessPool(2)` with `schedule(..., timeout=10)`; the task is
  `def noop(x): return x`. Two floors: msgpack ping-pong over two `os.pipe`s between two
  processes (the broker↔worker path), and msgpack echo over a Unix socket (an asyncio
  `Protocol` server in another process, 4-byte length-prefixed frames; the client↔broker
  path). The floors carry messages shaped like our `run` and `enqueue` messages.
- **latency**: sequential submit → result after a warm-up; pbt-server: `enqueue` + `result()`
  on one page (the sync client, and the asyncio client); floors: one request, one reply.
- **throughput**: pbt-server and the socket floor: 1, 5 and 50 client processes (one session
  each, asyncio client), each keeping {WINDOW} tasks in flight; start on a common signal;
  tasks / (last end - first start). The pools: submit all tasks, then wait for all. The
  pipe floor: one pair, {WINDOW} in flight. The default concurrency (5 running, 100 waiting
  per session) suffices: nothing is raised.
- **timeout**: a codeunit that spins forever, timeout 200 ms, one at a time on an idle pool.
  The deadline starts at the worker's acknowledgement, which the client cannot see, so the
  error is approximated as *(error arrival) - (arrival of the enqueue reply) - 200 ms*. The
  broker sends the reply right after writing the job to the worker, and the worker acks as
  soon as it reads it, so the two clocks start within about 0.1 ms of each other. pebble:
  *(TimeoutError raised) - (schedule call) - 200 ms*.
- **cancel**: `ChildSessionsMaxConcurrency = 1`; the session has a running task (sleeping)
  and a waiting no-op; time from `cancel()` to the no-op's result, minus the median no-op
  round trip of the same session (so the figure is what the cancel adds). The other worker
  is idle, so the freed slot can start at once.
- **kill**: `Workers.Count = 1`; a sleeping task's worker gets SIGKILL; kill →
  `ChildSessionCrashed` arrives → a no-op enqueued then completes on the replacement. The
  target uses the total (it includes one no-op round trip).
- "Running" (cancel, kill, scale) means the codeunit itself has written its pid to a file
  (`benchmarks/codeunits.py`): `status()` shows a worker busy as soon as the task is sent
  to it, before the worker's acknowledgement, and a worker killed before acknowledging has
  its task requeued, not failed. The killed pid is the one the codeunit wrote (the worker).
- **scale**: `Count = 1` busy with a long sleep, `ChildSessionsMaxConcurrency = 1`,
  `ChildSessionsMaxQueueLength = 200000`; at each depth: enqueues one after another (round
  trip), then a batch in flight at once (asyncio client; cost = elapsed / batch). A fresh
  broker per run. After each fill the measuring client calls `gc.collect(); gc.freeze()`:
  its own 10^5 task handles otherwise cost it gen-2 collections of up to ~0.5 s, which is
  the client's cost, not the broker's (the broker's own collections are not suppressed).
- **Noise**: the machine may be shared. The line "Other processes' CPU" above the tables is
  the machine's busy time during each measurement minus the CPU of this benchmark's own
  processes; ratios within one run are the robust part when it is high.
- **rss**: a fresh broker per run; its RSS (psutil) before and after 1,000 connections have
  said hello (idle sessions, no page).

## Latest results

{README_BEGIN}
{README_END}
"""


def write_outputs(out: Path, report: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    json_path = results / f"{report['date']}.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, json_path)
    readme = out / "README.md"
    text = readme.read_text() if readme.exists() else README_TEMPLATE
    if README_BEGIN not in text or README_END not in text:
        text = text.rstrip("\n") + f"\n\n## Latest results\n\n{README_BEGIN}\n{README_END}\n"
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    text = f"{head}{README_BEGIN}\n{markdown}\n{README_END}{tail}"
    tmp = readme.with_name("README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)
    return json_path, readme


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "os": platform.platform(),
        "pbt_server": pbt_server.__version__,
        "commit": _git_commit(),
        "msgpack": ".".join(str(x) for x in msgpack.version),
        "pebble": pebble.__version__,
        "psutil": psutil.__version__,
        "loadavg": list(os.getloadavg()),
    }


def _git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    return commit


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return shlex.join([str(python), "scripts/bench.py", *argv])


def _raise_fd_limit(wanted: int) -> None:
    """Brokers inherit the limit: 1,000 sessions need 1,000+ descriptors on both ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _on_terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pbt-server against ProcessPoolExecutor, pebble, "
        "multiprocessing.Pool and two transport floors, interleaved, in one run.",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 5; --quick: 1)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, for a smoke test (< 60 s)"
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"figures to run, of: {', '.join(FIGURES)}",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="write DIR/results/<date>.json and DIR/README.md (default: benchmarks/ for a "
        "full run; --quick and --only runs only print unless --out is given)",
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    figures = list(FIGURES)
    if args.only:
        figures = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in figures if name not in FIGURES]
        if unknown or not figures:
            parser.error(f"--only: unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    args.figures = [f for f in FIGURES if f in figures]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    params = Params.quick() if args.quick else Params()
    runs = args.runs or (1 if args.quick else 5)
    out: Path | None = args.out
    if out is None and not args.quick and not args.only:
        out = REPO / "benchmarks"
    signal.signal(signal.SIGTERM, _on_terminate)
    signal.signal(signal.SIGHUP, _on_terminate)
    _raise_fd_limit(params.rss_sessions * 2 + 1024)
    started = datetime.datetime.now().astimezone()
    report: dict[str, Any] = {
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "command": _command(argv),
        "quick": args.quick,
        "runs": runs,
        "figures": args.figures,
        "machine": machine_info(),
        "params": asdict(params) | {"window": WINDOW, "timeout_ms": TIMEOUT_MS},
    }
    bench = Bench(params, runs, args.figures)
    t0 = time.monotonic()
    try:
        outcome = bench.run()
    finally:
        bench.cleanup()
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarize(outcome)
    report["targets"] = [asdict(t) | {"met": t.met} for t in targets(outcome, params)]
    report["errors"] = outcome.errors
    report["results"] = outcome.data
    markdown = render_markdown(report)
    print(markdown)
    if out is not None:
        json_path, readme = write_outputs(out, report, markdown)
        _progress(f"wrote {json_path} and {readme}")
    _progress(f"done in {report['seconds']:.0f} s")
    return 1 if outcome.errors else 0


if __name__ == "__main__":
    sys.exit(main())
