"""Numbers: percentiles, and CPU time per part of the cluster over a measurement.

CPU comes from the kernel's per-process accounting (psutil), by pid, for each part: the
broker processes, their workers, HAProxy, each PostgreSQL server, the client processes. The
machine is shared, so the other processes' CPU over the same window is reported as well.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence

import psutil

Groups = Callable[[], dict[str, set[int]]]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    """p50, p99, max and count of ``values`` times ``scale`` (e.g. 1e3 for ms)."""
    return {
        "p50": round(percentile(values, 0.5) * scale, digits),
        "p99": round(percentile(values, 0.99) * scale, digits),
        "max": round(max(values) * scale, digits) if values else math.nan,
        "n": len(values),
    }


def _cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
    return seconds


class CpuMeter:
    """CPU seconds each group of processes used between construction and :meth:`stop`."""

    def __init__(self, groups: Groups) -> None:
        self._groups = groups
        self._start_groups = groups()
        self._start = _cpu_seconds(set().union(*self._start_groups.values()))
        self._machine = psutil.cpu_times()
        self._wall = time.monotonic()

    def stop(self, **measured: float) -> dict[str, float]:
        """Seconds per group, plus ``measured`` (parts that timed themselves, such as client
        processes that have exited); ``other`` is the machine's busy time none accounts for."""
        wall = time.monotonic() - self._wall
        end_groups = self._groups()
        names = set(self._start_groups) | set(end_groups)
        used: dict[str, float] = {name: round(value, 3) for name, value in measured.items()}
        ours = sum(measured.values())
        for name in sorted(names):
            pids = self._start_groups.get(name, set()) | end_groups.get(name, set())
            end = _cpu_seconds(pids)
            seconds = sum(end[pid] - self._start.get(pid, 0.0) for pid in end)
            used[name] = round(seconds, 3)
            ours += seconds
        machine = psutil.cpu_times()
        busy = sum(
            getattr(machine, part) - getattr(self._machine, part)
            for part in ("user", "system", "nice", "irq", "softirq")
            if hasattr(machine, part)
        )
        used["other"] = round(max(0.0, busy - ours), 3)
        used["wall"] = round(wall, 3)
        return used
