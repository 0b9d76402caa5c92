"""The result cache of ``@codeunit(..., shared=True, cache=True)``, and the data version that
invalidates it.

An entry is the results of a completed execution, keyed like the execution (codeunit,
parameters, context when ``per_context``), tagged with the **data version** read just before
the execution was handed to its worker (so before the worker's snapshot: a commit after that
moment makes the version move, and the entry is not served; it never serves data older than
what the database holds). A lookup serves an entry only while the version is still the one
it was tagged with, and, with ``max_age``, while it is young enough. Errors are never kept.
Memory is bounded (``[Workers] ResultCacheMB``), least recently used first out.

The data version is read by the broker itself, from the database's own files, in a few µs
and without a connection or a lock:

- SQLite in WAL mode: the WAL index header at the start of the ``-shm`` file (its two copies
  must agree): the transaction counter, the last valid WAL frame and the WAL salts (a
  restarted WAL has new salts). Comparable across every connection, unlike ``PRAGMA
  data_version``, which is per connection.
- SQLite in rollback-journal mode: the file change counter in the database header, which
  every commit increments (in WAL mode it does not move, hence the index header).

PostgreSQL has no such file a broker can read (``pg_current_wal_lsn()`` takes a round trip
to the server, which the broker's loop must not wait for): on PostgreSQL, ``cache=True``
codeunits are shared but not cached, and the broker says so at start.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pbt_server.budget import map_size

Version = Hashable
_DB_HEADER: Final = 100
_WAL_INDEX_HEADER: Final = 48  # one copy; the file starts with two
_WAL_INDEX: Final = struct.Struct("=IIIBBHIIIIIIII")  # iVersion ... aSalt[2], aCksum[2]
_ENTRY_OVERHEAD: Final = 400  # the entry, its key and the OrderedDict's slot


def sqlite_version(path: Path) -> Callable[[], Version | None]:
    """A reader of the SQLite database's data version (None when it cannot be read now)."""
    shm = f"{path}-shm"

    def read() -> Version | None:
        try:
            header = _read(str(path), _DB_HEADER)
            if len(header) < _DB_HEADER:
                return None
            if header[18] != 2:  # write version 1: rollback journal
                return ("journal", header[24:28])
            index = _read(shm, 2 * _WAL_INDEX_HEADER)
        except OSError:
            return None
        if len(index) < 2 * _WAL_INDEX_HEADER or index[:48] != index[48:]:
            return None  # no WAL index, or a writer is changing it right now
        fields = _WAL_INDEX.unpack_from(index)
        change, frames, salts = fields[2], fields[6], fields[10:12]
        return ("wal", change, frames, *salts)

    return read


def _read(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Entry:
    version: Version
    results: dict[str, str]
    made_at: float  # when its execution was handed to a worker
    size: int


class ResultCache:
    """Completed results by execution key, LRU within ``limit`` bytes; pure bookkeeping."""

    def __init__(self, limit: int, version: Callable[[], Version | None] | None) -> None:
        self.limit = limit
        self.version = version  # None: the backend has no readable version: nothing cached
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.version is not None and self.limit > 0

    def version_now(self) -> Version | None:
        return self.version() if self.version is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float, max_age: float | None) -> dict[str, str] | None:
        """The results to serve for ``key`` now, or None (a miss, counted)."""
        entry = self._entries.get(key)
        if entry is not None:
            fresh = max_age is None or now - entry.made_at <= max_age
            if fresh and self.version is not None and self.version() == entry.version:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.results
            self._drop(key)
        self.misses += 1
        return None

    def put(self, key: Hashable, version: Version, results: dict[str, str], made_at: float) -> None:
        size = map_size(results) + _ENTRY_OVERHEAD
        if size > self.limit:
            return
        self._drop(key)
        self._entries[key] = Entry(version, results, made_at, size)
        self.used += size
        while self.used > self.limit:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= entry.size
