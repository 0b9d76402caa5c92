"""``ctx.db`` on SQLite (``[Database] Url = sqlite:///path``): read-only in three layers.

1. The file is opened with URI ``mode=ro``: SQLite's pager refuses every write to it,
   whatever SQL runs (even after ``PRAGMA query_only = 0``).
2. ``PRAGMA query_only = ON``, which also covers databases other than the file.
3. An authorizer on the connection denies what ``mode=ro`` does not cover: ``ATTACH`` (an
   attached file would open read-write, and ``ATTACH``/``VACUUM INTO`` create files), setting
   a pragma (``query_only``, ``temp_store_directory`` …; pragmas that only read, such as
   ``table_info(t)``, stay allowed), ``BEGIN``/``COMMIT``/``SAVEPOINT``.

Snapshots: in WAL mode a task's statements run in one read transaction the worker begins on
the task's first statement (a WAL reader never blocks the application's writers), so they
all see the same snapshot. In rollback-journal mode a read transaction would hold SQLite's
shared lock for the whole task and make the application's writes fail with "database is
locked"; there each statement is its own snapshot, and its lock is released as soon as its
rows have been read. After every task the worker closes the cursors the task left open.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from pbt_server.errors import ChildSessionCode
from workers.dbapi import DatabaseUnavailable, Rows, WriteDenied, refuse_commit

__all__ = ["SQLiteDatabase", "error_code", "open_sqlite"]

_WRITE_DENIED_MARKERS: Final = ("readonly database", "query_only", "not authorized", "read-only")
_BUSY: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED: a lock not granted in time
_INTERRUPT: Final = 9  # SQLITE_INTERRUPT: the statement timeout stopped it
_PROGRESS_STEPS: Final = 10_000  # VM instructions between two looks at the statement deadline

# Pragmas that take an argument and only read; every other pragma given a value is refused.
_READING_PRAGMAS: Final = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)


class _Authorizer:
    """``set_authorizer`` callback: deny what ``mode=ro`` and ``query_only`` leave open.

    Runs when SQLite compiles a statement (the sqlite3 module caches compiled statements, so a
    repeated query does not call it again). Remembers why it denied, for the error message.
    ``internal`` lets the worker's own ``BEGIN`` through.
    """

    __slots__ = ("denied", "internal")

    def __init__(self) -> None:
        self.denied: str | None = None
        self.internal = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        if action == sqlite3.SQLITE_PRAGMA:
            if arg2 is None or (arg1 or "").lower() in _READING_PRAGMAS:
                return sqlite3.SQLITE_OK
            self.denied = f"setting PRAGMA {arg1} is not allowed"
        elif action == sqlite3.SQLITE_ATTACH:
            # VACUUM and VACUUM INTO attach their target too; this denies them as well.
            self.denied = f"ATTACH and VACUUM are not allowed ({arg1!r})"
        elif action == sqlite3.SQLITE_DETACH:
            self.denied = "DETACH is not allowed"
        elif action == sqlite3.SQLITE_TRANSACTION:
            if arg1 == "ROLLBACK" or self.internal:  # harmless, and what the worker runs
                return sqlite3.SQLITE_OK
            self.denied = f"{arg1} is not allowed; transaction control belongs to the worker"
        elif action == sqlite3.SQLITE_SAVEPOINT:
            self.denied = (
                "SAVEPOINT and RELEASE are not allowed; transaction control belongs to the worker"
            )
        else:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    def take(self) -> str | None:
        denied, self.denied = self.denied, None
        return denied


class _Deadline:
    """Progress handler: stops a statement that runs past ``StatementTimeout``."""

    __slots__ = ("at", "limit")

    def __init__(self, limit_s: float) -> None:
        self.limit = limit_s
        self.at = float("inf")

    def start(self) -> None:
        self.at = time.monotonic() + self.limit

    def __call__(self) -> int:
        return 1 if time.monotonic() > self.at else 0


class SQLiteDatabase:
    """``ctx.db`` on SQLite: ``sqlite3`` underneath, ``?``/``:name`` placeholders."""

    backend = "sqlite"
    paramstyle = "qmark"
    __slots__ = ("_authorizer", "_connection", "_cursors", "_deadline", "_snapshot")

    def __init__(
        self,
        connection: sqlite3.Connection,
        authorizer: _Authorizer,
        *,
        snapshot: bool,
        deadline: _Deadline | None,
    ) -> None:
        self._connection = connection
        self._authorizer = authorizer
        self._snapshot = snapshot  # WAL: one read transaction per task
        self._deadline = deadline
        self._cursors: list[sqlite3.Cursor] = []

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), /) -> Rows:
        """Run one statement with bound ``params``; a string with several is refused."""
        connection = self._connection
        if self._snapshot and not connection.in_transaction:
            self._begin()
        if self._deadline is not None:
            self._deadline.start()
        try:
            cursor = connection.execute(sql, params)
        except sqlite3.DatabaseError as err:
            denied = self._authorizer.take()
            if denied is None:
                raise
            raise WriteDenied(f"ctx.db is read-only: {denied} ({err})") from err
        self._cursors.append(cursor)
        return Rows(cursor)

    def _begin(self) -> None:
        self._authorizer.internal = True
        try:
            self._connection.execute("BEGIN")
        finally:
            self._authorizer.internal = False

    def rollback(self) -> None:
        """End the task's read transaction, if any; the next statement begins a new one."""
        self._connection.rollback()

    def commit(self) -> NoReturn:
        """Refused: nothing can be written."""
        refuse_commit()

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    def end_task(self) -> None:
        # A half-read cursor would keep its statement, and SQLite's shared lock, into the
        # next task: the application's writes would fail with "database is locked".
        for cursor in self._cursors:
            cursor.close()
        self._cursors.clear()
        if self._connection.in_transaction:
            self._connection.rollback()

    def __repr__(self) -> str:
        return "<ctx.db: SQLite, read-only>"


def open_sqlite(path: Path, *, statement_timeout_ms: int = 0) -> SQLiteDatabase:
    """Open ``path`` read-only; raise :class:`DatabaseUnavailable` saying why not."""
    if not path.is_file():
        raise DatabaseUnavailable(
            f"database file {str(path)!r} does not exist "
            "(create it, or run `pbt-server demo` for the demo database)"
        )
    try:
        connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            check_same_thread=False,
            isolation_level=None,
        )
        connection.execute("PRAGMA query_only = ON")
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as err:
        raise DatabaseUnavailable(f"cannot open {str(path)!r} read-only: {err}") from err
    authorizer = _Authorizer()
    connection.set_authorizer(authorizer)
    deadline = None
    if statement_timeout_ms:
        deadline = _Deadline(statement_timeout_ms / 1000)
        connection.set_progress_handler(deadline, _PROGRESS_STEPS)
    return SQLiteDatabase(
        connection, authorizer, snapshot=str(mode).lower() == "wal", deadline=deadline
    )


def error_code(exc: BaseException) -> str | None:
    """The stable code of an SQLite error a page can act on, or None."""
    if not isinstance(exc, sqlite3.Error):
        return None
    text = str(exc).lower()
    if any(marker in text for marker in _WRITE_DENIED_MARKERS):
        return ChildSessionCode.DB_WRITE_DENIED
    errorcode = getattr(exc, "sqlite_errorcode", None)
    if errorcode is not None:
        errorcode &= 0xFF  # extended codes carry the primary one in the low byte
    if errorcode in _BUSY or "database is locked" in text:
        return ChildSessionCode.DB_TIMEOUT
    if errorcode == _INTERRUPT or text == "interrupted":
        return ChildSessionCode.DB_TIMEOUT
    return None
