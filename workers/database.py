"""``ctx.db``: the worker's database connection, read-only at the database level.

``open_database(url)`` runs once per worker, at boot, after the fork; ``[Database] Url`` picks
the backend. Both hand codeunits the same thin, DB-API-shaped object (:class:`Database`):
``execute(sql, params)`` returning :class:`Rows` (``fetchone``/``fetchmany``/``fetchall``,
iteration, ``description``), ``rollback()``, ``in_transaction``; ``commit()`` raises
:class:`WriteDenied`. The raw connection and its dangerous methods (``executescript``,
``set_authorizer``, ``autocommit``, ``cursor().connection`` …) are not part of that object.

SQLite (``sqlite:///path``, this module): three layers.

1. The file is opened with URI ``mode=ro``: SQLite's pager refuses every write to it,
   whatever SQL runs (even after ``PRAGMA query_only = 0``).
2. ``PRAGMA query_only = ON``, which also covers databases other than the file.
3. An authorizer on the connection denies what ``mode=ro`` does not cover: ``ATTACH`` (an
   attached file would open read-write, and ``ATTACH``/``VACUUM INTO`` create files), setting
   a pragma (``query_only``, ``temp_store_directory`` …; pragmas that only read, such as
   ``table_info(t)``, stay allowed), ``BEGIN``/``COMMIT``/``SAVEPOINT``. Each statement is its own
   read (autocommit), so a task holds SQLite's shared lock only while a statement runs.

PostgreSQL (``postgresql://…``): see ``workers/postgres.py``.

A refused write surfaces as ``DB:WriteDenied`` (:func:`write_denied_code`) with the database's
own message (``attempt to write a readonly database``, ``cannot execute INSERT in a read-only
transaction``) or, for what the wrapper itself refuses, a :class:`WriteDenied` saying why.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol
from urllib.parse import unquote

from pbt_server.errors import DB_WRITE_DENIED

__all__ = [
    "Database",
    "DatabaseUnavailable",
    "Rows",
    "SQLiteDatabase",
    "WriteDenied",
    "open_database",
    "preload",
    "sqlite_path",
    "write_denied_code",
]

_WRITE_DENIED_MARKERS: Final = ("readonly database", "query_only", "not authorized", "read-only")
# SQLSTATEs PostgreSQL uses when a read-only transaction refuses a write, or refuses to be
# ended or made read-write from inside a task: read_only_sql_transaction (INSERT, DDL, nextval,
# SELECT FOR UPDATE …), active_sql_transaction ("transaction read-write mode must be set before
# any query", "VACUUM cannot run inside a transaction block"), invalid_transaction_termination
# (COMMIT inside DO or CALL).
_WRITE_DENIED_SQLSTATES: Final = frozenset({"25006", "25001", "2D000"})
_POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")


class DatabaseUnavailable(Exception):
    """The database named by ``[Database] Url`` cannot be opened."""


class WriteDenied(Exception):
    """``ctx.db`` refused something that could write or end the task's read-only transaction.

    The worker reports it as ``DB:WriteDenied``; the database itself refuses ordinary writes
    with its own error, which gets the same code.
    """


class Rows:
    """What ``ctx.db.execute`` returns: the statement's rows, and nothing that leads back to
    the connection (a DB-API cursor's ``connection`` attribute would)."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def fetchone(self) -> Any:
        """The next row (a tuple), or None when there are no more."""
        return self._cursor.fetchone()

    def fetchmany(self, size: int | None = None) -> list[Any]:
        """Up to ``size`` more rows (default: the cursor's ``arraysize``, 1)."""
        cursor = self._cursor
        return cursor.fetchmany(cursor.arraysize if size is None else size)

    def fetchall(self) -> list[Any]:
        """All remaining rows."""
        return self._cursor.fetchall()

    def __iter__(self) -> Iterator[Any]:
        yield from self._cursor

    @property
    def description(self) -> Any:
        """DB-API ``description``: one 7-tuple per column (name first), None for no rows."""
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        """DB-API ``rowcount`` (-1 when the driver does not know)."""
        return self._cursor.rowcount


class Database(Protocol):
    """The interface ``ctx.db`` offers on every backend."""

    backend: str
    """``"sqlite"`` or ``"postgresql"``."""
    paramstyle: str
    """The driver's placeholders: ``"qmark"`` (``?``, ``:name``) or ``"pyformat"`` (``%s``)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Rows: ...
    def rollback(self) -> None: ...
    def commit(self) -> NoReturn: ...
    @property
    def in_transaction(self) -> bool: ...


def _refuse_commit() -> NoReturn:
    raise WriteDenied(
        "ctx.db is read-only: commit() is not allowed; the worker ends each task's reads itself"
    )


# --- SQLite ---------------------------------------------------------------------------------

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
    """

    __slots__ = ("denied",)

    def __init__(self) -> None:
        self.denied: str | None = None

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
            if arg1 == "ROLLBACK":  # harmless, and what the worker runs after a task
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


class SQLiteDatabase:
    """``ctx.db`` on SQLite: ``sqlite3`` underneath, ``?``/``:name`` placeholders."""

    backend = "sqlite"
    paramstyle = "qmark"
    __slots__ = ("_authorizer", "_connection")

    def __init__(self, connection: sqlite3.Connection, authorizer: _Authorizer) -> None:
        self._connection = connection
        self._authorizer = authorizer

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = (), /) -> Rows:
        """Run one statement with bound ``params``; a string with several is refused."""
        try:
            return Rows(self._connection.execute(sql, params))
        except sqlite3.DatabaseError as err:
            denied = self._authorizer.take()
            if denied is None:
                raise
            raise WriteDenied(f"ctx.db is read-only: {denied} ({err})") from err

    def rollback(self) -> None:
        """End an open read transaction, if any (harmless; the worker calls it after a task)."""
        self._connection.rollback()

    def commit(self) -> NoReturn:
        """Refused: nothing can be written."""
        _refuse_commit()

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    def __repr__(self) -> str:
        return "<ctx.db: SQLite, read-only>"


def sqlite_path(url: str) -> Path | None:
    """``sqlite:///relative/path`` or ``sqlite:////absolute/path`` -> the file's path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    return Path(unquote(url[len(prefix) :]))


def _open_sqlite(path: Path) -> SQLiteDatabase:
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
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as err:
        raise DatabaseUnavailable(f"cannot open {str(path)!r} read-only: {err}") from err
    authorizer = _Authorizer()
    connection.set_authorizer(authorizer)
    return SQLiteDatabase(connection, authorizer)


# --- both -----------------------------------------------------------------------------------


def _is_postgres(url: str) -> bool:
    return url.lower().startswith(_POSTGRES_SCHEMES)


def preload(url: str) -> None:
    """Import the backend's driver now (in the broker, before it forks its workers).

    Optional: without it each worker imports psycopg at boot, which costs a respawned worker
    about 150 ms before it is ready.
    """
    if _is_postgres(url):
        # Without psycopg, each worker says so at boot (DatabaseUnavailable).
        with contextlib.suppress(ImportError):
            import workers.postgres  # noqa: F401


def open_database(url: str) -> Database:
    """Open ``url`` read-only; raise :class:`DatabaseUnavailable` saying why not."""
    path = sqlite_path(url)
    if path is not None:
        return _open_sqlite(path)
    if _is_postgres(url):
        try:
            from workers.postgres import open_postgres
        except ImportError as err:
            raise DatabaseUnavailable(
                f"[Database] Url is PostgreSQL, but psycopg cannot be imported ({err}); "
                "install the extra: pip install 'pbt-server[postgres]'"
            ) from err
        return open_postgres(url)
    raise DatabaseUnavailable(
        f"unsupported database URL {url!r} (expected sqlite:///path or postgresql://...)"
    )


def write_denied_code(exc: BaseException) -> str | None:
    """``DB:WriteDenied`` if ``exc`` is the database (or ``ctx.db``) refusing a write, else None."""
    if isinstance(exc, WriteDenied):
        return DB_WRITE_DENIED
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        if any(marker in text for marker in _WRITE_DENIED_MARKERS):
            return DB_WRITE_DENIED
        return None
    # psycopg's errors carry the SQLSTATE; checked by name so SQLite-only installs need no psycopg.
    if type(exc).__module__.startswith("psycopg") and (
        getattr(exc, "sqlstate", None) in _WRITE_DENIED_SQLSTATES
    ):
        return DB_WRITE_DENIED
    return None
