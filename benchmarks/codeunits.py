"""Codeunits the benchmark runs (``[Codeunits] Modules = benchmarks.codeunits``).

Kept apart from ``tests.codeunits`` so that changing a test cannot change a published number.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Final

from benchmarks import work
from workers import ChildSession, codeunit

NOOP = 9001
SLEEP = 9002
SPIN = 9003
BUSY = 9004
SHARED_NOOP = 9005
CACHED_NOOP = 9006
STOPPED = 9007
# The role center's four cues: each a read of the customer table, plain and shared=True.
CUE_FILTERS: Final = ("%1", "%2%", "Customer 0%", "%7_")
CUES: Final = tuple(range(9011, 9011 + len(CUE_FILTERS)))
SHARED_CUES: Final = tuple(range(9021, 9021 + len(CUE_FILTERS)))


@codeunit(NOOP, name="BenchNoop")
def noop(ctx: ChildSession) -> dict[str, str]:
    return {}


@codeunit(SLEEP, name="BenchSleep")
def sleep(ctx: ChildSession) -> dict[str, str]:
    """Sleep ``seconds``; with ``started``, first publish our pid in that file (atomically).

    The file proves the task is running: the worker took the job off its pipe before
    calling us, so a kill is a crash, not a requeue of a task that never started.
    """
    path = ctx.parameters.get("started")
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
    work.sleep(float(ctx.parameters.get("seconds", "0")))
    return {}


@codeunit(SPIN, name="BenchSpin")
def spin(ctx: ChildSession) -> dict[str, str]:
    """Burn CPU until killed (the watchdog's timeout is the only way out)."""
    work.spin()
    return {}


@codeunit(BUSY, name="BenchBusy")
def busy(ctx: ChildSession) -> dict[str, str]:
    """Burn CPU for ``ms`` milliseconds: a read query of that length, for the cancel storm."""
    return {"loops": str(work.busy(float(ctx.parameters.get("ms", "20"))))}


@codeunit(SHARED_NOOP, name="BenchSharedNoop", shared=True)
def shared_noop(ctx: ChildSession) -> dict[str, str]:
    """A no-op whose identical tasks share one execution (the benchmark gives it unique
    parameters: every task is a miss, so the figure is what sharing costs)."""
    return {}


@codeunit(CACHED_NOOP, name="BenchCachedNoop", shared=True, cache=True)
def cached_noop(ctx: ChildSession) -> dict[str, str]:
    """A no-op whose result the broker keeps while the data is unchanged: after the first
    task, identical ones are served from the cache without reaching a worker."""
    return {}


@codeunit(STOPPED, name="BenchStopped")
def stopped(ctx: ChildSession) -> dict[str, str]:
    """Stop this worker (SIGSTOP): a process stuck where no signal is handled, so the
    broker's request for its stack before the timeout kill is never answered."""
    os.kill(os.getpid(), signal.SIGSTOP)
    work.spin()
    return {}


def _read_for(ctx: ChildSession, pattern: str, ms: float) -> int:
    """Count the customers whose name is LIKE ``pattern``, again and again until ``ms``
    milliseconds have passed: a read query of that length on any machine."""
    deadline = time.perf_counter() + ms / 1000
    while True:
        (count,) = ctx.db.execute(
            "SELECT count(*) FROM customer WHERE name LIKE ?", (pattern,)
        ).fetchone()
        if time.perf_counter() >= deadline:
            return int(count)


def _cue(pattern: str) -> Callable[[ChildSession], dict[str, str]]:
    def cue(ctx: ChildSession) -> dict[str, str]:
        return {"Count": str(_read_for(ctx, pattern, float(ctx.parameters.get("ms", "20"))))}

    return cue


for _number, (_plain, _shared, _pattern) in enumerate(
    zip(CUES, SHARED_CUES, CUE_FILTERS, strict=True), 1
):
    codeunit(_plain, name=f"BenchCue{_number}")(_cue(_pattern))
    codeunit(_shared, name=f"BenchSharedCue{_number}", shared=True)(_cue(_pattern))
