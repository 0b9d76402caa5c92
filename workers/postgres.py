"""``ctx.db`` on PostgreSQL (``[Database] Url = postgresql://…``, psycopg 3).

One connection per worker, opened at boot. A codeunit cannot make it write, nor make it
writable, through ``ctx.db``; every claim below is exercised by ``tests/integration/
test_database.py`` against a real server.

1. **The session default** is read-only: the connection starts with ``options=-c
   default_transaction_read_only=on`` (a startup option, so ``RESET`` restores it too).
2. **Each task reads in one transaction the wrapper begins itself**, on the task's first
   statement: ``BEGIN READ ONLY; SELECT 1`` in one round trip. The ``SELECT`` takes the
   transaction's snapshot, after which PostgreSQL refuses ``SET TRANSACTION READ WRITE`` and
   ``set_config('transaction_read_only', 'off', true)`` ("transaction read-write mode must be
   set before any query"). So the transaction stays read-only whatever the codeunit runs;
   ``SET default_transaction_read_only = off`` only concerns later transactions.
3. **Nothing can end that transaction early** (after which a new one could be begun
   read-write): statements whose first keyword is transaction control (``COMMIT``, ``END``,
   ``ROLLBACK``, ``ABORT``, ``BEGIN``, ``START``, ``SAVEPOINT``, ``RELEASE``, ``PREPARE``) are
   refused before they are sent, as are the few non-reads PostgreSQL permits in a read-only
   transaction (``LOCK``, ``COPY``, ``ANALYZE``, ``CLUSTER``, ``REINDEX``, ``VACUUM``,
   ``CHECKPOINT``, ``LOAD``, ``DISCARD``, ``DEALLOCATE``). ``commit()`` is refused. Each
   ``execute`` goes through the extended query protocol, which PostgreSQL limits to a single
   statement ("cannot insert multiple commands into a prepared statement") — with or without
   parameters; psycopg would otherwise use the simple protocol, which runs
   ``SELECT 1; COMMIT; …``. A worker checks this at boot and refuses to start if it does not
   hold. ``COMMIT`` inside ``DO`` or ``CALL`` fails: the transaction block is ours.
   The transaction is ``REPEATABLE READ READ ONLY`` by default (``[Database] Isolation``), so
   every statement of a task sees the same snapshot; ``Serializable`` gives ``SERIALIZABLE
   READ ONLY DEFERRABLE`` (not on a hot standby), ``ReadCommitted`` a snapshot per statement.
4. **After every task the worker rolls back** (``ROLLBACK; SELECT pg_advisory_unlock_all()``):
   ``SET``/``set_config`` changes are undone, anything PostgreSQL let through in a read-only
   transaction (e.g. ``lo_create``) never commits, and session advisory locks are released.

What ``ctx.db`` cannot stop: SQL that acts outside this session's transaction — functions that
open another connection (``dblink``), write server files or run programs (``COPY … TO
PROGRAM``, ``lo_export``, superuser or ``pg_write_server_files`` only), or signal other
backends (``pg_terminate_backend``). Connect as a dedicated role that may only ``SELECT``
(README, "Writing a codeunit"); then such a call fails on privileges too, and so does anything
a codeunit might do with the credentials outside ``ctx.db``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from pbt_server.errors import ChildSessionCode
from workers.dbapi import DatabaseUnavailable, Rows, WriteDenied, refuse_commit

__all__ = ["PostgresDatabase", "error_code", "first_keyword", "open_postgres", "refusal"]

_READ_ONLY_OPTION: Final = "-c default_transaction_read_only=on"
_CONNECT_TIMEOUT_S: Final = "10"
_ISOLATION: Final = {
    "ReadCommitted": "READ COMMITTED READ ONLY",
    "RepeatableRead": "REPEATABLE READ READ ONLY",
    "Serializable": "SERIALIZABLE READ ONLY DEFERRABLE",
}
_END: Final = "ROLLBACK; SELECT pg_advisory_unlock_all()"
# SQLSTATEs PostgreSQL uses when a read-only transaction refuses a write, or refuses to be
# ended or made read-write from inside a task: read_only_sql_transaction (INSERT, DDL, nextval,
# SELECT FOR UPDATE …), active_sql_transaction ("transaction read-write mode must be set before
# any query", "VACUUM cannot run inside a transaction block"), invalid_transaction_termination
# (COMMIT inside DO or CALL).
_WRITE_DENIED: Final = frozenset({"25006", "25001", "2D000"})
_CODES: Final = {
    "40P01": ChildSessionCode.DB_DEADLOCK,
    "40001": ChildSessionCode.DB_SERIALIZATION_FAILURE,  # also a standby's recovery conflict
    "57014": ChildSessionCode.DB_TIMEOUT,  # query_canceled: statement_timeout
    "55P03": ChildSessionCode.DB_TIMEOUT,  # lock_not_available: lock_timeout
    "57P01": ChildSessionCode.DB_CONNECTION_LOST,  # admin_shutdown
    "57P02": ChildSessionCode.DB_CONNECTION_LOST,  # crash_shutdown
    "57P03": ChildSessionCode.DB_CONNECTION_LOST,  # cannot_connect_now (starting, recovering)
}

_TRANSACTION_CONTROL: Final = frozenset(
    {"abort", "begin", "commit", "end", "prepare", "release", "rollback", "savepoint", "start"}
)
# Not reads, yet PostgreSQL allows them in a read-only transaction (or they reach beyond it).
_NOT_READS: Final = frozenset(
    {
        "analyse",
        "analyze",
        "checkpoint",
        "cluster",
        "copy",
        "deallocate",
        "discard",
        "load",
        "lock",
        "reindex",
        "vacuum",
    }
)
# What PostgreSQL's scanner skips before a statement's first keyword: whitespace (a superset of
# its [ \t\n\r\f], v16 adds \v), empty statements (";"), and "--" comments up to \n or \r.
# Nested /* */ comments are walked by hand below.
_SKIP: Final = re.compile(r"(?:[ \t\n\r\f\v;]+|--[^\n\r]*)*")
_WORD: Final = re.compile(r"[A-Za-z_]+")


def first_keyword(sql: str) -> str:
    """The first word of ``sql`` as PostgreSQL's parser sees it, lower-cased ('' if none)."""
    pos = _SKIP.match(sql).end()  # type: ignore[union-attr]  # the pattern matches ''
    while sql.startswith("/*", pos):
        pos = _after_block_comment(sql, pos)
        pos = _SKIP.match(sql, pos).end()  # type: ignore[union-attr]
    word = _WORD.match(sql, pos)
    return word.group().lower() if word else ""


def _after_block_comment(sql: str, pos: int) -> int:
    """Index just past the (nested) comment opening at ``pos``; len(sql) if unterminated."""
    depth, pos, end = 1, pos + 2, len(sql)
    while depth and pos < end:
        if sql.startswith("/*", pos):
            depth, pos = depth + 1, pos + 2
        elif sql.startswith("*/", pos):
            depth, pos = depth - 1, pos + 2
        else:
            pos += 1
    return pos


def refusal(sql: str) -> str | None:
    """Why ``ctx.db`` refuses ``sql`` before sending it, or None to let PostgreSQL decide."""
    word = first_keyword(sql)
    if word in _TRANSACTION_CONTROL:
        return (
            f"ctx.db is read-only: {word.upper()} is not allowed; transaction control belongs"
            " to the worker, which runs each task in one read-only transaction"
        )
    if word in _NOT_READS:
        return f"ctx.db is read-only: {word.upper()} is not a read and is not allowed"
    return None


class _ExtendedProtocolCursor(psycopg.Cursor[Any]):
    """A cursor that always uses the extended query protocol: one statement per execute.

    psycopg sends a query without parameters through the simple protocol, which runs several
    ``;``-separated statements. ``_execute_send`` is psycopg's internal hook for this choice
    (its ``stream()`` and server cursors force it the same way); :func:`open_postgres` checks at
    boot that it still works.
    """

    def _execute_send(self, query: Any, *, force_extended: bool = False, **kwargs: Any) -> None:
        super()._execute_send(query, force_extended=True, **kwargs)


Query = str | bytes | pgsql.SQL | pgsql.Composed


class PostgresDatabase:
    """``ctx.db`` on PostgreSQL: psycopg 3 underneath, ``%s``/``%(name)s`` placeholders."""

    backend = "postgresql"
    paramstyle = "pyformat"
    __slots__ = ("_begin_sql", "_connection", "_params")

    def __init__(
        self, connection: psycopg.Connection[Any], params: dict[str, Any], isolation: str
    ) -> None:
        self._connection = connection
        self._params = params
        # The SELECT takes the snapshot, after which the transaction cannot be made writable.
        self._begin_sql = f"BEGIN ISOLATION LEVEL {_ISOLATION[isolation]}; SELECT 1"

    def execute(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] | None = None, /
    ) -> Rows:
        """Run one statement with bound ``params`` in the task's read-only transaction."""
        connection = self._connection
        reason = refusal(_text(query, connection))
        if reason is not None:
            raise WriteDenied(reason)
        status = connection.info.transaction_status
        if status != TransactionStatus.INTRANS and status != TransactionStatus.INERROR:
            connection = self._begin()  # IDLE: the task's first statement; UNKNOWN: lost
        cursor = _ExtendedProtocolCursor(connection)
        cursor.execute(query, params)
        return Rows(cursor)

    def _begin(self) -> psycopg.Connection[Any]:
        """Begin the task's transaction; reconnect first if the server dropped us."""
        try:
            if not self._connection.closed:
                self._connection.execute(self._begin_sql)
                return self._connection
        except psycopg.OperationalError:
            if not self._connection.closed:
                raise
        # Lost (server restart, pg_terminate_backend): nothing of the task ran yet, so
        # reconnecting and beginning again is safe. A failure here fails the task.
        self._connection = _connect(self._params)
        self._connection.execute(self._begin_sql)
        return self._connection

    def rollback(self) -> None:
        """End the task's read transaction (the next statement begins a new one)."""
        if self.in_transaction:
            self._connection.execute(_END)

    def commit(self) -> NoReturn:
        """Refused: nothing can be written."""
        refuse_commit()

    def end_task(self) -> None:
        if self.in_transaction:
            self._connection.execute(_END)

    @property
    def in_transaction(self) -> bool:
        connection = self._connection
        return (
            not connection.closed and connection.info.transaction_status != TransactionStatus.IDLE
        )

    def __repr__(self) -> str:
        return "<ctx.db: PostgreSQL, read-only>"

    def __del__(self) -> None:
        # The worker is exiting: say goodbye to the server instead of dropping the socket.
        with contextlib.suppress(Exception):
            self._connection.close()


def _text(query: Query, connection: psycopg.Connection[Any]) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode(connection.info.encoding, errors="replace")
    if isinstance(query, pgsql.SQL | pgsql.Composed):
        return query.as_string(connection)
    raise TypeError(
        f"query must be str, bytes, psycopg.sql.SQL or psycopg.sql.Composed, not {type(query)}"
    )


def _connect(params: dict[str, Any]) -> psycopg.Connection[Any]:
    # autocommit=True: psycopg sends no BEGIN of its own; the wrapper begins each task's
    # transaction as READ ONLY itself. prepare_threshold=None: ROLLBACK (every task) makes
    # psycopg drop its prepared statements, so preparing would only add round trips.
    return psycopg.connect(**params, autocommit=True, prepare_threshold=None)


def _describe(params: Mapping[str, Any]) -> str:
    """user@host:port/dbname, for messages (never the password)."""
    host = params.get("host") or params.get("hostaddr") or "(default host)"
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return f"{user}{host}{port}/{params.get('dbname', '')}"


def open_postgres(
    url: str, *, isolation: str = "RepeatableRead", statement_timeout_ms: int = 0
) -> PostgresDatabase:
    """Connect read-only; raise :class:`DatabaseUnavailable` saying why not."""
    scheme, _, rest = url.partition("://")
    try:
        params: dict[str, Any] = conninfo_to_dict(f"{scheme.lower()}://{rest}")
    except psycopg.Error as err:
        raise DatabaseUnavailable(f"bad PostgreSQL URL: {err}") from err
    options = f"{params.get('options', '')} {_READ_ONLY_OPTION}"
    if statement_timeout_ms:
        options += f" -c statement_timeout={statement_timeout_ms}"
    params["options"] = options.strip()
    params.setdefault("connect_timeout", _CONNECT_TIMEOUT_S)
    params.setdefault("application_name", "pbt-server worker")
    where = _describe(params)
    try:
        connection = _connect(params)
    except psycopg.Error as err:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL {where}: {err}") from err
    try:
        _check_single_statement(connection)
    except psycopg.Error as err:
        connection.close()
        raise DatabaseUnavailable(f"PostgreSQL {where}: {err}") from err
    return PostgresDatabase(connection, params, isolation)


def _check_single_statement(connection: psycopg.Connection[Any]) -> None:
    try:
        _ExtendedProtocolCursor(connection).execute("SELECT 1; SELECT 2")
    except psycopg.errors.SyntaxError as err:
        if "multiple commands" in str(err):
            return
        raise
    connection.close()
    raise DatabaseUnavailable(
        f"psycopg {psycopg.__version__} ran two statements in one execute; ctx.db relies on"
        " the extended query protocol refusing that, so the worker will not start"
    )


def error_code(exc: BaseException) -> str | None:
    """The stable code of a PostgreSQL error a page can act on, or None."""
    if not isinstance(exc, psycopg.Error):
        return None
    sqlstate = exc.sqlstate or ""
    if sqlstate in _WRITE_DENIED:
        return ChildSessionCode.DB_WRITE_DENIED
    if sqlstate in _CODES:
        return _CODES[sqlstate]
    if sqlstate.startswith("08") or (isinstance(exc, psycopg.OperationalError) and not sqlstate):
        return ChildSessionCode.DB_CONNECTION_LOST  # connection_exception, or no answer at all
    return None
