"""``ctx.db``: the worker's database connection, read-only at the database level.

``open_database(section)`` runs once per worker, at boot, after the fork; ``[Database] Url``
picks the backend (``workers/sqlite.py``, ``workers/postgres.py``). Both hand codeunits the
same thin, DB-API-shaped object (``workers.dbapi.Database``): ``execute(sql, params)``
returning ``Rows`` (``fetchone``/``fetchmany``/``fetchall``, iteration, ``description``),
``rollback()``, ``in_transaction``; ``commit()`` raises ``WriteDenied``. The raw connection
and its dangerous methods (``executescript``, ``set_authorizer``, ``autocommit``,
``cursor().connection`` …) are not part of that object.

A database error a page can act on reaches the error trigger with a stable code
(:func:`error_code`): ``DB:WriteDenied`` with the database's own message (``attempt to write
a readonly database``, ``cannot execute INSERT in a read-only transaction``) or, for what the
wrapper itself refuses, a ``WriteDenied`` saying why; ``DB:Deadlock``,
``DB:SerializationFailure``, ``DB:Timeout``, ``DB:ConnectionLost``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NoReturn

from pbt_server.errors import ChildSessionCode
from workers import sqlite
from workers.dbapi import Database, DatabaseUnavailable, Rows, WriteDenied, refuse_commit

if TYPE_CHECKING:
    from pbt_server.config import DatabaseSection

__all__ = ["Database", "DatabaseUnavailable", "WriteDenied", "error_code", "open_database"]


def preload(section: DatabaseSection) -> None:
    """Import the backend's driver now (in the broker, before it forks its workers).

    Optional: without it each worker imports psycopg at boot, which costs a respawned worker
    about 150 ms before it is ready.
    """
    if section.url.backend == "postgresql":
        # Without psycopg, each worker says so at boot (DatabaseUnavailable).
        with contextlib.suppress(ImportError):
            import workers.postgres  # noqa: F401


def open_database(section: DatabaseSection, *, required: bool = True) -> Database:
    """Open the database read-only.

    ``required``: raise :class:`DatabaseUnavailable` saying why it cannot be opened (a
    server's first workers: a start must fail when the database is wrong). Otherwise a
    worker replacing another one boots anyway and connects on its first statement, so a
    database outage fails tasks (``DB:ConnectionLost``) but never stops the server.
    """
    try:
        return _open(section)
    except DatabaseUnavailable:
        if required:
            raise
        return Unconnected(section)


class Unconnected:
    """``ctx.db`` of a worker that booted while the database was unreachable: every
    statement first tries to connect; once that works it is the real thing."""

    __slots__ = ("_db", "_section", "backend", "paramstyle")

    def __init__(self, section: DatabaseSection) -> None:
        self._section = section
        self._db: Database | None = None
        self.backend = section.url.backend
        self.paramstyle = "qmark" if self.backend == "sqlite" else "pyformat"

    def _connected(self) -> Database:
        if self._db is None:
            self._db = _open(self._section)
        return self._db

    def execute(self, sql: Any, params: Any = None, /) -> Rows:
        db = self._connected()
        return db.execute(sql) if params is None else db.execute(sql, params)

    def rollback(self) -> None:
        if self._db is not None:
            self._db.rollback()

    def commit(self) -> NoReturn:
        refuse_commit()

    @property
    def in_transaction(self) -> bool:
        return self._db is not None and self._db.in_transaction

    def end_task(self) -> None:
        if self._db is not None:
            self._db.end_task()


def _open(section: DatabaseSection) -> Database:
    url = section.url
    if url.path is not None:
        return sqlite.open_sqlite(url.path, statement_timeout_ms=section.statement_timeout_ms)
    try:
        from workers.postgres import open_postgres
    except ImportError as err:
        raise DatabaseUnavailable(
            f"[Database] Url is PostgreSQL, but psycopg cannot be imported ({err}); "
            "install the extra: pip install 'pbt-server[postgres]'"
        ) from err
    return open_postgres(
        url.text, isolation=section.isolation, statement_timeout_ms=section.statement_timeout_ms
    )


def error_code(exc: BaseException) -> str | None:
    """The stable ``DB:…`` code of a database error, or None for any other exception."""
    if isinstance(exc, WriteDenied):
        return exc.code
    if isinstance(exc, DatabaseUnavailable):
        return ChildSessionCode.DB_CONNECTION_LOST
    code = sqlite.error_code(exc)
    # psycopg's errors are recognised by module, so SQLite-only installs need no psycopg.
    if code is None and type(exc).__module__.startswith("psycopg"):
        from workers.postgres import error_code as postgres_code

        code = postgres_code(exc)
    return code
