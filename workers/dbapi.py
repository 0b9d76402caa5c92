"""What ``ctx.db`` is on every backend: the :class:`Database` interface, :class:`Rows`, and
the errors a backend raises. A leaf module: the backends import it, it imports none of them.

Error codes: a database error that a page can act on reaches the error trigger with a stable
code instead of a driver's class name (``DB:WriteDenied``, ``DB:Deadlock``,
``DB:SerializationFailure``, ``DB:Timeout``, ``DB:ConnectionLost``); each backend says which
of its errors are which (:func:`workers.database.error_code`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn, Protocol

from pbt_server.errors import ChildSessionCode, CodeunitError

__all__ = ["Database", "DatabaseUnavailable", "Rows", "WriteDenied", "refuse_commit"]


class DatabaseUnavailable(Exception):
    """The database named by ``[Database] Url`` cannot be opened."""


class WriteDenied(CodeunitError):
    """``ctx.db`` refused something that could write or end the task's read-only transaction.

    The database itself refuses ordinary writes with its own error, which gets the same code.
    """

    code = ChildSessionCode.DB_WRITE_DENIED.value


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

    def end_task(self) -> None:
        """Called by the worker after every task: end its reads and transaction."""


def refuse_commit() -> NoReturn:
    raise WriteDenied(
        "ctx.db is read-only: commit() is not allowed; the worker ends each task's reads itself"
    )
