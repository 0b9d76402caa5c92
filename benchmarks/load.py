"""Many client processes at once: the throughput figure's load, for pbt-server and the socket
floor alike, and the role center's crowd of sessions.

:func:`at_once` runs one asyncio client per process; each prepares (connects, warms up),
says it is ready, and all start their timed part on a common signal. Throughput: each
process runs one session (one connection) keeping ``WINDOW`` calls in flight, and the figure
is tasks / (last end - first start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks.cells import FORK, die_with_parent
from benchmarks.timing import BenchError, Metrics

WINDOW: Final = 8  # calls in flight per client session

Call = Callable[[], Awaitable[object]]
# Opens one session on ``address``; returns (one call, close).
Opener = Callable[[str], Awaitable[tuple[Call, Callable[[], Awaitable[object]]]]]
# A client process's part: ``prepare(address, share)`` connects and warms up, and returns
# (the timed part, whose value is sent back; what to do after it, untimed).
Timed = Callable[[], Awaitable[Any]]
Prepare = Callable[[str, int], Awaitable[tuple[Timed, Call]]]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _client_main(prepare: Prepare, address: str, share: int, conn: Connection) -> None:
    timed, after = await prepare(address, share)
    conn.send("ready")
    conn.recv()  # "go": blocks the loop on purpose, nothing else is due
    t0 = time.monotonic()
    value = await timed()
    t1 = time.monotonic()
    await after()
    conn.send((t0, t1, value))


def _client_process(prepare: Prepare, address: str, share: int, conn: Connection) -> None:
    die_with_parent()
    asyncio.run(_client_main(prepare, address, share, conn))


def at_once(
    prepare: Prepare, address: str, shares: Sequence[int], limit: float = 600
) -> list[tuple[float, float, Any]]:
    """One client process per share, started on a common signal once all are prepared;
    per process ``(start, end, value)`` of its timed part (``time.monotonic``, one clock
    for every process of the machine)."""
    procs, conns = [], []
    try:
        for share in shares:
            ours, theirs = FORK.Pipe()
            proc = FORK.Process(
                target=_client_process, args=(prepare, address, share, theirs), daemon=True
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
            if not conn.poll(limit):
                raise BenchError("a client process did not finish")
            spans.append(conn.recv())
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return spans


def throughput_clients(opener: Opener, address: str, sessions: int, total: int) -> Metrics:
    """``sessions`` client processes, each ``WINDOW`` calls in flight; calls/s overall."""

    async def prepare(address: str, count: int) -> tuple[Timed, Call]:
        one, close = await opener(address)

        async def lane(n: int) -> None:
            for _ in range(n):
                await one()

        async def timed() -> int:
            await asyncio.gather(*(lane(n) for n in split(count, WINDOW) if n))
            return count

        for _ in range(5):  # warm-up: connection, page, code paths
            await one()
        return timed, close

    spans = at_once(prepare, address, split(total, sessions))
    start = min(s[0] for s in spans)
    end = max(s[1] for s in spans)
    done = sum(s[2] for s in spans)
    return {"tasks_per_s": done / (end - start), "tasks": done, "seconds": end - start}
