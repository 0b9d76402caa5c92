"""The work the figures measure, as plain functions: the pools run these, and the codeunits
in ``benchmarks/codeunits.py`` call the same ones, so both sides do exactly the same."""

from __future__ import annotations

import time


def noop(x: int = 0) -> int:
    return x


def spin() -> None:
    """Burn CPU forever (only a kill ends it)."""
    x = 0
    while True:
        x += 1


def busy(ms: float) -> int:
    """Burn CPU for ``ms`` milliseconds, like a query of that length; returns the loops run."""
    deadline = time.perf_counter() + ms / 1000
    loops = 0
    while time.perf_counter() < deadline:
        loops += 1
    return loops


def sleep(seconds: float) -> None:
    time.sleep(seconds)
