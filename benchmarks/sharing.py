"""Shared executions and the result cache (``@codeunit(..., shared=True, cache=True)``):

- :func:`role_center`: many sessions open the same role center at once, its cues plain or
  ``shared=True``; how many executions ran, and when every cue of every session was filled.
- :func:`round_trip`: the sequential round trip of a plain no-op, of a ``shared=True`` one
  that always misses (unique parameters), and of a ``cache=True`` one served from the cache.

Each checks from the broker's status that it measured what it names (every cue ran or
attached, every shared task missed, every cached one hit).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.load import Call, Timed, at_once, split
from benchmarks.timing import BenchError, Metrics, percentile, stats_us, time_calls
from pbt_server.client import aio, connect


def _counts(socket_path: str) -> dict[str, int]:
    """What the broker has done so far: tasks its workers finished, attaches, cache lookups,
    and workers replaced (a replaced worker's count would be lost)."""
    with connect(socket_path) as session:
        status: Mapping[str, Any] = session.status()
    totals = status["totals"]
    return {
        "executions": sum(w["tasks_done"] for w in status["workers"]),
        "attaches": totals["shared"]["attaches"],
        "hits": totals["cache"]["hits"],
        "misses": totals["cache"]["misses"],
        "worker_ends": sum(totals["worker_ends"].values()),
    }


def _delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    if after["worker_ends"] != before["worker_ends"]:
        raise BenchError("a worker was replaced during the measurement: its count is lost")
    return {key: after[key] - before[key] for key in before}


# --- the role center ---------------------------------------------------------------------


def role_center(
    socket_path: str, sessions: int, processes: int, cues: Sequence[int], query_ms: float
) -> Metrics:
    """``sessions`` sessions (over ``processes`` asyncio client processes), connected first;
    then at once each opens the role center and enqueues its cues (the same parameters in
    every session) and waits for them all. From the common start: when the last cue of
    each session was filled."""
    parameters = {"ms": str(query_ms)}

    async def prepare(address: str, count: int) -> tuple[Timed, Call]:
        opened = [await aio.connect(address) for _ in range(count)]
        await asyncio.gather(*(session.ping() for session in opened))

        async def user(session: aio.Session) -> float:
            page = await session.open_page("Role Center")
            tasks = [await page.enqueue_background_task(cue, parameters) for cue in cues]
            for task in tasks:
                await task.result(timeout=300)
            return time.monotonic()

        async def timed() -> list[float]:
            return list(await asyncio.gather(*(user(session) for session in opened)))

        async def close() -> None:
            await asyncio.gather(*(session.close() for session in opened))

        return timed, close

    before = _counts(socket_path)
    spans = at_once(prepare, socket_path, [n for n in split(sessions, processes) if n])
    done = _delta(before, _counts(socket_path))
    start = min(span[0] for span in spans)
    filled = [end - start for span in spans for end in span[2]]
    tasks = sessions * len(cues)
    if done["executions"] + done["attaches"] != tasks:
        raise BenchError(
            f"{tasks} cues, but {done['executions']} executions + {done['attaches']} attaches"
        )
    return {
        "tasks": tasks,
        "executions": done["executions"],
        "attaches": done["attaches"],
        "all_filled_ms": max(filled) * 1e3,
        "session_p50_ms": percentile(filled, 50) * 1e3,
    }


# --- round trips: a plain no-op, a shared miss, a cache hit ------------------------------------


def round_trip(socket_path: str, codeunit: int, n: int, warmup: int, expect: str) -> Metrics:
    """The sync client's sequential round trip of ``codeunit``. ``expect``: ``"run"``, every
    task runs (parameters unique to each task); ``"miss"``, the same on a shared codeunit,
    none attached; ``"hit"``, the same parameters every time, served from the cache after
    the first."""
    tag = f"{os.getpid()}.{time.monotonic_ns()}-"  # no earlier measurement's entry matches
    count = iter(range(1 << 62))

    def unique() -> dict[str, str]:
        return {"k": f"{tag}{next(count)}"}

    def same() -> dict[str, str]:
        return {"k": tag}

    parameters = same if expect == "hit" else unique
    before = _counts(socket_path)
    with connect(socket_path) as session:
        page = session.open_page("Bench", "Bench: 1")
        samples = time_calls(
            lambda: page.enqueue_background_task(codeunit, parameters()).result(), n, warmup
        )
    done = _delta(before, _counts(socket_path))
    calls = n + warmup
    expected = {
        "run": {"executions": calls, "attaches": 0},
        "miss": {"executions": calls, "attaches": 0, "hits": 0},
        "hit": {"executions": 1, "attaches": 0, "hits": calls - 1, "misses": 1},
    }[expect]
    wrong = {key: done[key] for key, value in expected.items() if done[key] != value}
    if wrong:
        raise BenchError(f"{calls} tasks ({expect}): expected {expected}, the broker did {wrong}")
    return stats_us(samples)
