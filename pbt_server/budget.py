"""The broker's memory budget (``[Server] MaxBufferedMB``), shared by connections and queues.

What a client can make the broker hold: a frame whose header has arrived but whose body has
not (the broker buffers it), the parameters of tasks waiting in a queue, its pages' names and
record ids, and its session's context. Each takes from one budget before it is allowed to
grow; when it is spent, new work is refused with a clear code (``ServerMemoryBudget``)
instead of the broker growing until the OOM killer ends it and every session with it. Sizes
are Python's own (``sys.getsizeof``: a text of 4-byte characters counts four bytes a
character). Not counted: the events a client does not read (its transport stops reading its
requests at 4 MiB instead), and what the broker needs per connection.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Final

# Python's cost of a dict[str, str] beyond its strings: the dict, and a slot per entry; and
# of a page beyond its two strings. Estimates, but stable ones: the order of magnitude counts.
_MAP_OVERHEAD: Final = 240
_ENTRY_OVERHEAD: Final = 64
_PAGE_OVERHEAD: Final = 200


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
    """The memory a map of texts holds (a task's parameters, a session's context)."""
    size = sys.getsizeof
    return _MAP_OVERHEAD + sum(size(k) + size(v) + _ENTRY_OVERHEAD for k, v in parameters.items())


def page_size(name: str, record: str) -> int:
    """The memory an open page holds, estimated."""
    return _PAGE_OVERHEAD + sys.getsizeof(name) + sys.getsizeof(record)
