"""Codeunits the benchmark runs (``[Codeunits] Modules = benchmarks.codeunits``).

Kept apart from ``tests.codeunits`` so that changing a test cannot change a published number.
"""

from __future__ import annotations

import os
import signal

from benchmarks import work
from workers import ChildSession, codeunit

NOOP = 9001
SLEEP = 9002
SPIN = 9003
BUSY = 9004
STOPPED = 9007


@codeunit(NOOP, name="BenchNoop")
def noop(ctx: ChildSession) -> dict[str, str]:
    return {}


@codeunit(SLEEP, name="BenchSleep")
def sleep(ctx: ChildSession) -> dict[str, str]:
    """Sleep ``seconds``; with ``started``, first publish our pid in that file (atomically).

    The file proves the task is running: the worker acknowledged it before calling us, so
    the broker's timeout clock runs and a kill is a crash, not a requeue of a task that
    never started.
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


@codeunit(STOPPED, name="BenchStopped")
def stopped(ctx: ChildSession) -> dict[str, str]:
    """Stop this worker (SIGSTOP): a process stuck where no signal is handled, so the
    broker's request for its stack before the timeout kill is never answered."""
    os.kill(os.getpid(), signal.SIGSTOP)
    work.spin()
    return {}
