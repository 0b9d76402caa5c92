"""The broker's event loop, as ``[Server] EventLoop`` names it.

uvloop (the ``fast`` extra) runs the broker's loop in C: about 15% less of the broker's CPU per
task (``benchmarks/breakdown.py``). Nothing depends on it; ``asyncio`` forces asyncio's own
loop, ``auto`` takes uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``choice`` (auto, asyncio, uvloop; checked when the config was
    read), or None for asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":  # installed when the config was read, and removed since
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
