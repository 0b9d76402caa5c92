"""The worker's database connection, opened read-only at the database level.

SQLite: the file is opened with URI ``mode=ro`` (the connection itself cannot write, whatever
SQL it runs) and ``PRAGMA query_only`` as a second guard. A write attempt raises
``sqlite3.OperationalError`` ("attempt to write a readonly database"), which the worker
reports as ``DB:WriteDenied`` with the database's own message.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import unquote

from pbt_server.errors import DB_WRITE_DENIED

_WRITE_DENIED_MARKERS = ("readonly database", "query_only", "not authorized", "read-only")


class DatabaseUnavailable(Exception):
    """The database named by ``[Database] Url`` cannot be opened."""


def sqlite_path(url: str) -> Path | None:
    """``sqlite:///relative/path`` or ``sqlite:////absolute/path`` -> the file's path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    return Path(unquote(url[len(prefix) :]))


def open_database(url: str) -> sqlite3.Connection:
    """Open ``url`` read-only; raise :class:`DatabaseUnavailable` saying why not."""
    path = sqlite_path(url)
    if path is None:
        raise DatabaseUnavailable(f"unsupported database URL {url!r} (only sqlite:/// for now)")
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
    return connection


def write_denied_code(exc: BaseException) -> str | None:
    """``DB:WriteDenied`` if ``exc`` is the database refusing a write, else None."""
    if isinstance(exc, sqlite3.Error) and any(
        marker in str(exc).lower() for marker in _WRITE_DENIED_MARKERS
    ):
        return DB_WRITE_DENIED
    return None
