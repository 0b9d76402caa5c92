"""Many client processes at once: the throughput figure's load, for pbt-server and the socket
floor alike. Each process runs one session (one connection) keeping ``WINDOW`` calls in
flight; all start on a common signal, and the figure is tasks / (last end - first start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Final

from benchmarks.cells import FORK, die_with_parent
from benchmarks.timing import BenchError, Metrics

WINDOW: Final = 8  # calls in flight per client session

Call = Callable[[], Awaitable[object]]
# Opens one session on ``address``; returns (one call, close).
Opener = Callable[[str], Awaitable[tuple[Call, Callable[[], Awaitable[object]]]]]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _client_main(opener: Opener, address: str, count: int, conn: Connection) -> None:
    one, close = await opener(address)

    async def lane(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(5):  # warm-up: connection, page, code paths
        await one()
    conn.send("ready")
    conn.recv()  # "go": blocks the loop on purpose, nothing else is due
    t0 = time.monotonic()
    await asyncio.gather(*(lane(n) for n in split(count, WINDOW) if n))
    t1 = time.monotonic()
    await close()
    conn.send((t0, t1, count))


def _client_process(opener: Opener, address: str, count: int, conn: Connection) -> None:
    die_with_parent()
    asyncio.run(_client_main(opener, address, count, conn))


def throughput_clients(opener: Opener, address: str, sessions: int, total: int) -> Metrics:
    """``sessions`` client processes, each ``WINDOW`` calls in flight; calls/s overall."""
    procs, conns = [], []
    try:
        for count in split(total, sessions):
            ours, theirs = FORK.Pipe()
            proc = FORK.Process(
                target=_client_process, args=(opener, address, count, theirs), daemon=True
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
