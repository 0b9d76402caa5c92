"""Clocks, percentiles and the statistics every figure reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

Metrics = dict[str, Any]  # metric name -> float (or a list of raw samples, "samples_*")


class BenchError(RuntimeError):
    pass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_calls(
    call: Callable[[], object],
    n: int,
    warmup: int,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """``warmup`` untimed calls, then the seconds each of ``n`` calls took (``before``, if
    given, runs untimed ahead of every call)."""
    for _ in range(warmup):
        if before is not None:
            before()
        call()
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


async def time_calls_async(
    call: Callable[[], Awaitable[object]], n: int, warmup: int
) -> list[float]:
    """:func:`time_calls` for a coroutine function."""
    for _ in range(warmup):
        await call()
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        t0 = clock()
        await call()
        samples.append(clock() - t0)
    return samples


def stats_us(samples_s: Sequence[float]) -> Metrics:
    us = [s * 1e6 for s in samples_s]
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "n": len(us)}


def stats_ms(prefix: str, samples_s: Sequence[float]) -> Metrics:
    ms = [s * 1e3 for s in samples_s]
    return {
        f"{prefix}p50_ms": percentile(ms, 50),
        f"{prefix}p99_ms": percentile(ms, 99),
        f"{prefix}max_ms": max(ms),
        f"samples_{prefix}ms": [round(v, 4) for v in ms],
    }


def wait_for(what: str, check: Callable[[], Any], limit: float = 10.0) -> Any:
    """Poll ``check`` until it returns something other than None / False."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.002)


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
