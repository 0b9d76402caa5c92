"""The broker's memory budget (``[Server] MaxBufferedMB``), shared by connections and queues.

Two things let a client make the broker hold memory it did not choose to spend: a frame whose
header has arrived but whose body has not (the broker buffers it), and the parameters of tasks
waiting in a queue. Both take from one budget before they are allowed to grow; when it is
spent, new work is refused with a clear code instead of the broker growing until the OOM
killer ends it and every session with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# Python's cost of a dict[str, str] beyond its characters: the dict, and per entry two str
# objects and a slot. An estimate, but a stable one: it is the order of magnitude that counts.
_MAP_OVERHEAD: Final = 240
_ENTRY_OVERHEAD: Final = 160


class Budget:
    """Bytes available to buffered input and waiting tasks; pure bookkeeping."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) if that would go over the limit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Return what :meth:`take` reserved."""
        self.used -= size
        assert self.used >= 0, self.used


def map_size(parameters: Mapping[str, str]) -> int:
    """The memory a task's parameters hold while it waits, estimated."""
    return _MAP_OVERHEAD + sum(len(k) + len(v) + _ENTRY_OVERHEAD for k, v in parameters.items())
