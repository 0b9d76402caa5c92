"""Measuring processes ("cells"): each measurement runs in a freshly forked process of its
own process group, so the pools, client processes and echo servers it starts die with it;
and how much CPU *other* processes used meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

import psutil

from benchmarks.timing import BenchError, Metrics

FORK: Final = multiprocessing.get_context("fork")
_PR_SET_PDEATHSIG: Final = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Linux: get ``signum`` when the process that forked us ends (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _cell_main(conn: Connection, function: Callable[..., Metrics], kwargs: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the parent does it too: no window where a kill misses our children
    die_with_parent()
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
            killpg(pid)  # whatever it left: pool workers, client processes, echo servers
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
            killpg(pid)
        self.live.clear()


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
