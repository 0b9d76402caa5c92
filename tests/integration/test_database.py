"""``ctx.db`` on both backends, through real brokers and workers: reads work; every kind of
write is refused with ``DB:WriteDenied`` and verified absent afterwards; a codeunit cannot make
``ctx.db`` writable, through SQL or through the object's API.

PostgreSQL runs for real: ``tests/pg.py`` starts a throwaway cluster (it fails, never skips,
when the server programs are missing). The workers connect as ``pbt_owner``, a role that may
write, so what refuses the writes is ``ctx.db`` itself, not privileges; one test uses the
SELECT-only role the README recommends.

The codeunits these tests run are defined here, at module level; the brokers load this module
(``[Codeunits] Modules``) next to ``tests.codeunits``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.pg import OWNER, READER, PostgresCluster, running_cluster
from tests.support import wait_until
from workers import ChildSession, codeunit
from workers.postgres import first_keyword, refusal

RUN_SQL = 301
POKE = 302
MODULES = f"tests.codeunits, {__name__}"


# --- codeunits (run in the workers) ---------------------------------------------------------


@codeunit(RUN_SQL, name="RunSql")
def run_sql(ctx: ChildSession) -> dict[str, str]:
    """Run ``steps`` (JSON: a list of ``[sql, params or null]``) through ``ctx.db``.

    Returns the last statement's rows. With ``tolerate``, a step that fails (except the last)
    is logged and rolled back, as a codeunit on PostgreSQL must after an error, and the next
    step runs; the last step's error always fails the task.
    """
    steps = json.loads(ctx.parameters["steps"])
    tolerate = ctx.parameters.get("tolerate") == "1"
    log: list[str] = []
    rows: list[list[Any]] = []
    for number, (sql, params) in enumerate(steps, 1):
        try:
            result = ctx.db.execute(sql) if params is None else ctx.db.execute(sql, params)
            rows = [list(row) for row in result] if result.description else []
            log.append("ok")
        except Exception as exc:
            if number == len(steps) or not tolerate:
                raise
            log.append(f"{type(exc).__name__}: {exc}")
            ctx.db.rollback()
    return {"rows": json.dumps(rows, default=str), "log": json.dumps(log)}


@codeunit(POKE, name="PokeApi")
def poke(ctx: ChildSession) -> dict[str, str]:
    """Try to reach past ``ctx.db``'s read-only interface (``attempt`` names how)."""
    db: Any = ctx.db  # untyped on purpose: these are the attributes it must not have
    attempt = ctx.parameters["attempt"]
    if attempt == "commit()":
        db.commit()
    elif attempt == "autocommit = True":
        db.autocommit = True
    elif attempt == "isolation_level = 'DEFERRED'":
        db.isolation_level = "DEFERRED"
    elif attempt == "read_only = False":
        db.read_only = False
    elif attempt == "execute(...).connection":
        _ = db.execute("SELECT 1").connection
    else:
        _ = getattr(db, attempt)  # a connection method ctx.db must not offer
    return {"reached": attempt}


# --- backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    broker: BrokerProcess
    pg: PostgresCluster | None

    def sql(self, text: str) -> str:
        """Test SQL is written with ``?`` (psycopg wants ``%s``) and ``{dir}`` for a place
        where no file may appear (the broker's directory)."""
        text = text.replace("{dir}", str(self.broker.directory))
        return text.replace("?", "%s") if self.pg is not None else text

    def task(self, codeunit_id: int, parameters: dict[str, str]) -> dict[str, str]:
        with self.broker.connect() as session:
            page = session.open_page("Database")
            task = page.enqueue_background_task(codeunit_id, parameters, timeout=60_000)
            return task.result(timeout=60)

    def run(self, *steps: str | tuple[str, Any], tolerate: bool = False) -> list[list[Any]]:
        """Run ``steps`` in one task; the last statement's rows."""
        encoded = [
            [self.sql(step), None] if isinstance(step, str) else [self.sql(step[0]), step[1]]
            for step in steps
        ]
        parameters = {"steps": json.dumps(encoded), "tolerate": "1" if tolerate else ""}
        rows: list[list[Any]] = json.loads(self.task(RUN_SQL, parameters)["rows"])
        return rows

    def refused(self, *steps: str | tuple[str, Any], tolerate: bool = False) -> BackgroundTaskError:
        with pytest.raises(BackgroundTaskError) as caught:
            self.run(*steps, tolerate=tolerate)
        return caught.value

    def fingerprint(self) -> object:
        """Everything a write could have changed, read past pbt-server."""
        if self.pg is None:
            db_file = self.broker.directory / "test.db"
            return hashlib.sha256(db_file.read_bytes()).hexdigest(), _listing(self.broker)
        with self.pg.connect() as admin:
            return [
                admin.execute(query).fetchall()
                for query in (
                    "SELECT count(*), sum(blocked), max(id),"
                    " md5(string_agg(name || blocked, ',' ORDER BY id)) FROM customer",
                    "SELECT n.nspname, c.relname, c.relkind, c.relpersistence, c.relacl::text,"
                    " obj_description(c.oid, 'pg_class') FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
                    " ORDER BY 1, 2",
                    "SELECT nspname FROM pg_namespace ORDER BY 1",
                    "SELECT proname FROM pg_proc"
                    " WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
                    "SELECT last_value, is_called FROM customer_id_seq",
                    "SELECT count(*) FROM pg_largeobject_metadata",
                    "SELECT count(*) FROM pg_prepared_xacts",
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                    "SELECT datname FROM pg_database ORDER BY 1",
                )
            ]

    def session_state(self) -> list[list[Any]]:
        """The worker connection's read-only settings, as the next task sees them."""
        if self.pg is None:
            return self.run(
                "SELECT (SELECT query_only FROM pragma_query_only),"
                " (SELECT count(*) FROM pragma_database_list WHERE name NOT IN ('main', 'temp'))"
            )
        return self.run(
            "SELECT current_setting('default_transaction_read_only'),"
            " current_setting('transaction_read_only')"
        )


READ_ONLY_STATE = {"sqlite": [[1, 0]], "postgresql": [["on", "on"]]}


def _listing(broker: BrokerProcess) -> list[str]:
    return sorted(os.listdir(broker.directory))


LISTING = ["pbt.log", "pbt.pid", "pbt.sock", "server.ini", "stderr.txt", "test.db"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with running_cluster() as cluster:
        with cluster.connect(OWNER) as owner:
            # Writes hidden in a function and in a procedure that commits first.
            owner.execute(
                "CREATE FUNCTION delete_customers() RETURNS bigint LANGUAGE sql AS"
                " $$ WITH gone AS (DELETE FROM customer RETURNING 1) SELECT count(*) FROM gone $$"
            )
            owner.execute(
                "CREATE PROCEDURE commit_then_delete() LANGUAGE plpgsql AS"
                " $$ BEGIN COMMIT; DELETE FROM customer; END $$"
            )
        yield cluster


def _start(url: str | None) -> BrokerProcess:
    config: dict[str, dict[str, str]] = {
        "Workers": {"Count": "1"},  # every task of a test meets the same connection
        "Codeunits": {"Modules": MODULES},
    }
    if url is not None:
        config["Database"] = {"Url": url}
    return BrokerProcess.start(config)


def _backend(name: str, pg: PostgresCluster | None) -> Iterator[Backend]:
    broker = _start(pg.owner_url if pg is not None else None)
    try:
        yield Backend(name, broker, pg)
        assert broker.stop() == 0, broker.log_text()
    finally:
        broker.cleanup()


@pytest.fixture(scope="module")
def sqlite_backend() -> Iterator[Backend]:
    """A one-worker broker on SQLite (its ``test.db``)."""
    yield from _backend("sqlite", None)


@pytest.fixture(scope="module")
def postgresql_backend(postgres: PostgresCluster) -> Iterator[Backend]:
    """A one-worker broker on PostgreSQL, connected as ``pbt_owner`` (who may write)."""
    yield from _backend("postgresql", postgres)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """``sqlite_backend`` or ``postgresql_backend``, by the test's (indirect) parameter."""
    chosen: Backend = request.getfixturevalue(f"{request.param}_backend")
    return chosen


def on(backends: str, *values: Any, label: str = "") -> list[Any]:
    """pytest params ``(backend, *values)`` for each backend named in ``backends``."""
    first = values[0] if values else ""
    text = f"{first[0]} (bound)" if isinstance(first, tuple) else str(first)
    name = label or re.sub(r"\s+", " ", text)[:70]
    return [pytest.param(b, *values, id=f"{b}: {name}") for b in backends.split()]


BOTH = "sqlite postgresql"


# --- reads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_reads_with_bound_parameters(backend: Backend) -> None:
    assert backend.run(("SELECT count(*) FROM customer WHERE blocked = ?", [1])) == [[10]]
    rows = backend.run("SELECT id, name, blocked FROM customer ORDER BY id")
    assert len(rows) == 50
    assert rows[0] == [1, "Customer 0", 1]
    # A parameter is data, never SQL.
    injection = ("SELECT count(*) FROM customer WHERE name = ?", ["x' OR '1'='1"])
    assert backend.run(injection) == [[0]]
    named = "SELECT name FROM customer WHERE id = " + (":id" if backend.pg is None else "%(id)s")
    assert backend.run((named, {"id": 2})) == [["Customer 1"]]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_a_task_reads_through_several_statements_and_cursors(backend: Backend) -> None:
    rows = backend.run(
        "SELECT count(*) FROM customer",
        ("SELECT name FROM customer WHERE blocked = ? ORDER BY id LIMIT 2", [1]),
    )
    assert rows == [["Customer 0"], ["Customer 5"]]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite3_style_codeunits_work_unchanged(backend: Backend) -> None:
    """tests.codeunits.DB_READ: ``ctx.db.execute(sql, params).fetchone()``, as with sqlite3."""
    assert backend.task(cu.DB_READ, {}) == {"blocked": "10"}


# --- writes ---------------------------------------------------------------------------------

WRITES = [
    *on(BOTH, "INSERT INTO customer (name, blocked) VALUES ('intruder', 0)"),
    *on(BOTH, ("INSERT INTO customer (name, blocked) VALUES (?, ?)", ["intruder", 0])),
    *on(BOTH, "UPDATE customer SET blocked = 1"),
    *on(BOTH, "DELETE FROM customer"),
    *on(BOTH, "CREATE TABLE intruder (id integer)"),
    *on(BOTH, "CREATE TEMP TABLE intruder (id integer)"),
    *on(BOTH, "CREATE VIEW intruder AS SELECT 1 AS one"),
    *on(BOTH, "CREATE INDEX intruder ON customer (name)"),
    *on(BOTH, "ALTER TABLE customer ADD COLUMN intruder integer"),
    *on(BOTH, "ALTER TABLE customer RENAME TO intruder"),
    *on(BOTH, "DROP TABLE customer"),
    *on(BOTH, "ANALYZE"),
    *on(BOTH, "VACUUM"),
    *on(BOTH, "BEGIN"),
    *on(BOTH, "COMMIT"),
    *on(BOTH, "SAVEPOINT intruder"),
    *on("sqlite", "REPLACE INTO customer (id, name, blocked) VALUES (1, 'intruder', 0)"),
    *on(
        "sqlite",
        "INSERT INTO customer (id, name, blocked) VALUES (1, 'x', 0)"
        " ON CONFLICT (id) DO UPDATE SET name = 'intruder'",
    ),
    *on(
        "sqlite",
        "CREATE TRIGGER intruder AFTER INSERT ON customer BEGIN DELETE FROM customer; END",
    ),
    *on("sqlite", "PRAGMA user_version = 7"),
    *on("sqlite", "PRAGMA journal_mode = WAL"),
    *on("sqlite", "PRAGMA query_only = 0"),
    *on("sqlite", "PRAGMA writable_schema = ON"),
    *on("sqlite", "PRAGMA temp_store_directory = '/tmp'"),
    *on("sqlite", "ATTACH '{dir}/intruder.db' AS intruder"),
    *on("sqlite", "ATTACH ':memory:' AS scratch"),
    *on("sqlite", "DETACH main"),
    *on("sqlite", "VACUUM INTO '{dir}/intruder.db'"),
    *on("sqlite", "BEGIN IMMEDIATE"),
    *on("sqlite", "END"),
    *on("sqlite", "RELEASE intruder"),
    *on("postgresql", "TRUNCATE customer"),
    *on("postgresql", "SELECT nextval('customer_id_seq')"),
    *on("postgresql", "SELECT setval('customer_id_seq', 1000)"),
    *on("postgresql", "SELECT * FROM customer FOR UPDATE"),
    *on("postgresql", "WITH gone AS (DELETE FROM customer RETURNING id) SELECT count(*) FROM gone"),
    *on(
        "postgresql",
        "MERGE INTO customer c USING (SELECT 1 AS id) s ON c.id = s.id"
        " WHEN MATCHED THEN UPDATE SET blocked = 2",
    ),
    *on("postgresql", "SELECT * INTO intruder FROM customer"),
    *on("postgresql", "CREATE TABLE intruder AS SELECT 1 AS one"),
    *on("postgresql", "CREATE SCHEMA intruder"),
    *on("postgresql", "CREATE DATABASE intruder"),
    *on("postgresql", "EXPLAIN ANALYZE DELETE FROM customer"),
    *on("postgresql", "DO $$ BEGIN DELETE FROM customer; END $$"),
    *on("postgresql", "SELECT delete_customers()"),
    *on("postgresql", "CALL commit_then_delete()"),
    *on("postgresql", "COMMENT ON TABLE customer IS 'intruder'"),
    *on("postgresql", "GRANT ALL ON customer TO PUBLIC"),
    *on("postgresql", "COPY customer FROM STDIN"),
    *on("postgresql", "COPY (SELECT 1) TO '{dir}/intruder.txt'"),
    *on("postgresql", "LOCK TABLE customer"),
    *on("postgresql", "CLUSTER customer USING customer_pkey"),
    *on("postgresql", "REINDEX TABLE customer"),
    *on("postgresql", "CHECKPOINT"),
    *on("postgresql", "LOAD 'plpgsql'"),
    *on("postgresql", "DISCARD ALL"),
    *on("postgresql", "DEALLOCATE ALL"),
    *on("postgresql", "PREPARE intruder AS DELETE FROM customer"),
    *on("postgresql", "END"),
    *on("postgresql", "ABORT"),
    *on("postgresql", "ROLLBACK"),
    *on("postgresql", "COMMIT AND CHAIN"),
    *on("postgresql", "ROLLBACK AND CHAIN"),
    *on("postgresql", "START TRANSACTION READ WRITE"),
    *on("postgresql", "RELEASE SAVEPOINT intruder"),
    *on("postgresql", "PREPARE TRANSACTION 'intruder'"),
    *on("postgresql", "COMMIT PREPARED 'intruder'"),
    *on("postgresql", "  /* a /* nested */ comment */ -- and a line\n ;commit"),
    *on("postgresql", "SET TRANSACTION READ WRITE"),
    *on("postgresql", "SET transaction_read_only = off"),
    *on("postgresql", "SELECT set_config('transaction_read_only', 'off', true)"),
]
# The database's own message, or ctx.db's for what it refuses before the database sees it.
DENIED_TEXT = re.compile(
    "readonly database|ctx.db is read-only|read-only transaction|before any query"
    "|cannot run inside a transaction block|invalid transaction termination"
)


@pytest.mark.parametrize(("backend", "statement"), WRITES, indirect=["backend"])
def test_every_kind_of_write_is_refused_and_leaves_nothing(
    backend: Backend, statement: str | tuple[str, Any]
) -> None:
    before = backend.fingerprint()
    error = backend.refused(statement)
    assert error.code == "DB:WriteDenied", error
    assert DENIED_TEXT.search(error.text), error.text
    assert backend.fingerprint() == before
    assert backend.session_state() == READ_ONLY_STATE[backend.name]
    assert _listing(backend.broker) == LISTING


@pytest.mark.parametrize(
    ("backend", "error_code"),
    [("sqlite", "ProgrammingError"), ("postgresql", "SyntaxError")],
    indirect=["backend"],
)
def test_one_statement_per_execute(backend: Backend, error_code: str) -> None:
    """Several statements in one string run none of them (psycopg would, without the wrapper)."""
    before = backend.fingerprint()
    for sql in (
        "SELECT 1; DELETE FROM customer",
        "DELETE FROM customer; SELECT 1",
        "SELECT 1; COMMIT; SET TRANSACTION READ WRITE; DELETE FROM customer",
    ):
        error = backend.refused(sql)
        assert error.code == error_code, error
        assert re.search("one statement at a time|multiple commands", error.text), error.text
    assert backend.fingerprint() == before


# --- ctx.db cannot be made writable ---------------------------------------------------------

DELETE = "DELETE FROM customer"
ESCAPES = [
    *on("sqlite", ["PRAGMA query_only = 0", DELETE]),
    *on("sqlite", ["PRAGMA main.query_only = OFF", DELETE]),
    *on(
        "sqlite", ["ATTACH '{dir}/intruder.db' AS intruder", "CREATE TABLE intruder.t (a)", DELETE]
    ),
    *on("sqlite", ["ATTACH ':memory:' AS scratch", "CREATE TABLE scratch.t (a)", DELETE]),
    *on("sqlite", ["BEGIN IMMEDIATE", DELETE]),
    *on("sqlite", ["VACUUM INTO '{dir}/intruder.db'", DELETE]),
    *on("postgresql", ["SET default_transaction_read_only = off", DELETE]),
    *on("postgresql", ["SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["SELECT set_config('default_transaction_read_only', 'off', false)", DELETE]),
    *on("postgresql", ["SET transaction_read_only = off", DELETE]),
    *on("postgresql", ["SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["SELECT set_config('transaction_read_only', 'off', true)", DELETE]),
    *on("postgresql", ["RESET ALL", DELETE]),
    *on("postgresql", ["SET ROLE NONE", DELETE]),
    *on("postgresql", ["COMMIT", "SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["COMMIT AND CHAIN", "SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["ROLLBACK AND CHAIN", "SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["PREPARE TRANSACTION 'x'", "SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["DISCARD ALL", "SET TRANSACTION READ WRITE", DELETE]),
    *on("postgresql", ["SAVEPOINT s", "SET TRANSACTION READ WRITE", DELETE]),
    *on(
        "postgresql",
        ["SET default_transaction_read_only = off", "COMMIT", DELETE],
        label="SET default off, COMMIT, DELETE",
    ),
    *on(
        "postgresql",
        ["DO $$ BEGIN COMMIT; SET TRANSACTION READ WRITE; DELETE FROM customer; END $$"],
    ),
]


@pytest.mark.parametrize(("backend", "steps"), ESCAPES, indirect=["backend"])
def test_ctx_db_cannot_be_made_writable_through_sql(backend: Backend, steps: list[str]) -> None:
    """Each attempt runs; whatever it achieved, the write after it is refused and nothing
    changed, and the next task finds the connection as read-only as before."""
    before = backend.fingerprint()
    error = backend.refused(*steps, tolerate=True)
    assert error.code == "DB:WriteDenied", error
    assert backend.fingerprint() == before
    assert backend.session_state() == READ_ONLY_STATE[backend.name]
    assert _listing(backend.broker) == LISTING


API_ATTEMPTS = [
    ("commit()", "DB:WriteDenied"),
    ("autocommit = True", "AttributeError"),
    ("isolation_level = 'DEFERRED'", "AttributeError"),
    ("read_only = False", "AttributeError"),
    ("execute(...).connection", "AttributeError"),
    *[
        (name, "AttributeError")
        for name in (
            "connection",
            "cursor",
            "close",
            "executescript",
            "executemany",
            "set_authorizer",
            "enable_load_extension",
            "create_function",
            "backup",
            "deserialize",
            "blobopen",
            "pgconn",
            "transaction",
            "set_read_only",
            "set_autocommit",
        )
    ],
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize(("attempt", "code"), API_ATTEMPTS)
def test_ctx_db_offers_no_way_around_read_only(backend: Backend, attempt: str, code: str) -> None:
    with pytest.raises(BackgroundTaskError) as caught:
        backend.task(POKE, {"attempt": attempt})
    assert caught.value.code == code, caught.value
    assert backend.session_state() == READ_ONLY_STATE[backend.name]


# --- what PostgreSQL lets through in a read-only transaction is rolled back -----------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "statement",
    [
        "SELECT lo_create(0)",  # PostgreSQL 15 permits it in a read-only transaction
        "SELECT pg_advisory_lock(4242)",  # session-level: outlives the transaction
        "SET search_path = pg_catalog",
        "SELECT set_config('statement_timeout', '1ms', false)",
        "LISTEN intruder",
        "NOTIFY intruder",
    ],
)
def test_what_postgresql_allows_in_a_task_ends_with_it(backend: Backend, statement: str) -> None:
    before = backend.fingerprint()
    backend.run(statement)
    assert backend.fingerprint() == before  # no large object, no advisory lock left
    assert backend.run("SHOW search_path") == [['"$user", public']]
    assert backend.run("SHOW statement_timeout") == [["0"]]
    assert backend.session_state() == READ_ONLY_STATE["postgresql"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_after_an_error_rollback_lets_the_task_go_on(backend: Backend) -> None:
    rows = backend.run("SELECT 1/0", "SELECT count(*) FROM customer", tolerate=True)
    assert rows == [[50]]


def test_the_recommended_select_only_role(
    postgres: PostgresCluster, start_broker: Callable[..., BrokerProcess]
) -> None:
    broker = start_broker(
        {
            "Workers": {"Count": "1"},
            "Codeunits": {"Modules": MODULES},
            "Database": {"Url": postgres.reader_url},
        }
    )
    backend = Backend("postgresql", broker, postgres)
    assert backend.run(("SELECT count(*) FROM customer WHERE blocked = ?", [1])) == [[10]]
    error = backend.refused(DELETE)
    assert error.code == "DB:WriteDenied", error
    # Defence in depth: past pbt-server, in a read-write transaction, the role still cannot.
    with postgres.connect(READER) as reader:
        reader.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute(DELETE)
    assert backend.run("SELECT count(*) FROM customer") == [[50]]


# --- connection lifecycle -------------------------------------------------------------------


def test_a_worker_reconnects_after_the_server_drops_it(
    postgres: PostgresCluster, start_broker: Callable[..., BrokerProcess]
) -> None:
    url = postgres.owner_url + "&application_name=pbt-reconnect-test"
    broker = start_broker(
        {"Workers": {"Count": "1"}, "Codeunits": {"Modules": MODULES}, "Database": {"Url": url}}
    )
    backend = Backend("postgresql", broker, postgres)
    assert backend.run("SELECT count(*) FROM customer") == [[50]]
    worker_pid = broker.worker_pids()[0]  # slot 0; the standby worker has a connection too
    count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pbt-reconnect-test'"
    with postgres.connect() as admin:
        terminated = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pbt-reconnect-test'"
        ).fetchall()
        assert terminated == [(True,), (True,)]
        wait_until(lambda: admin.execute(count).fetchone() == (0,))
        assert backend.run("SELECT count(*) FROM customer") == [[50]]
        assert admin.execute(count).fetchone() == (1,)  # the worker that ran it reconnected
    assert broker.worker_pids()[0] == worker_pid  # the same worker, a new connection


@pytest.mark.parametrize(
    ("make_url", "reason"),
    [
        (
            lambda pg: pg.owner_url.replace(str(pg.directory), "/tmp/pbt-no-such-dir"),
            "No such file",
        ),
        (lambda pg: pg.url(database="no_such_db"), 'database "no_such_db" does not exist'),
        (lambda pg: pg.url(user="no_such_role"), 'role "no_such_role" does not exist'),
    ],
    ids=["no server", "no database", "no role"],
)
def test_a_database_that_cannot_be_opened_stops_the_start(
    postgres: PostgresCluster, make_url: Callable[[PostgresCluster], str], reason: str
) -> None:
    with pytest.raises(AssertionError, match="exited with 1") as caught:
        _start(make_url(postgres))
    message = str(caught.value)
    assert "cannot connect to PostgreSQL" in message
    assert reason in message


# --- the statement screen, on its own -------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "keyword"),
    [
        ("COMMIT", "commit"),
        ("  commit;", "commit"),
        ("\t\n\r\f\vEnd", "end"),
        (";;COMMIT", "commit"),
        ("-- note\nCOMMIT", "commit"),
        ("-- note\rCOMMIT", "commit"),
        ("/* a */COMMIT", "commit"),
        ("/* a /* nested */ still a comment */ ROLLBACK", "rollback"),
        ("/**/abort", "abort"),
        ("/*/ */ begin", "begin"),
        ("/* ** */ start transaction", "start"),
        ("COMMIT/*x*/AND CHAIN", "commit"),
        ("SELECT 1 -- COMMIT", "select"),
        ("(SELECT 1)", ""),
        ("/* unterminated COMMIT", ""),
        ("", ""),
    ],
)
def test_first_keyword_skips_what_postgresql_skips(sql: str, keyword: str) -> None:
    assert first_keyword(sql) == keyword


def test_refusal_names_the_statement() -> None:
    assert refusal("SELECT 1") is None
    assert refusal("SET search_path = public") is None
    assert "COMMIT is not allowed" in (refusal(" commit and chain") or "")
    assert "LOCK is not a read" in (refusal("LOCK customer") or "")
