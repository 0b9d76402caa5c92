"""One snapshot per task, and database errors with codes a page can act on."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.pg import OWNER, PostgresCluster, running_cluster
from tests.support import wait_until


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with running_cluster() as cluster:
        yield cluster


def _counts_across_a_commit(
    broker: BrokerProcess, tmp_path: Path, insert: Callable[[], None]
) -> dict[str, str]:
    """Run DB_TWICE; between its two counts, another connection inserts a customer."""
    started, go = tmp_path / "started", tmp_path / "go"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(
            cu.DB_TWICE, {"started": str(started), "go": str(go)}, timeout=60_000
        )
        wait_until(started.exists, timeout=30)
        insert()
        go.write_text("1")
        return task.result(timeout=30)


@pytest.mark.parametrize(
    ("isolation", "same"), [("RepeatableRead", True), ("ReadCommitted", False)]
)
def test_postgresql_gives_each_task_one_snapshot_by_default(
    start_broker, postgres: PostgresCluster, tmp_path: Path, isolation: str, same: bool
) -> None:
    broker = start_broker({"Database": {"Url": postgres.owner_url, "Isolation": isolation}})

    def insert() -> None:
        with postgres.connect(OWNER) as db:
            db.execute("INSERT INTO customer (name, blocked) VALUES ('new', 0)")

    counts = _counts_across_a_commit(broker, tmp_path, insert)
    assert (counts["first"] == counts["second"]) is same, counts


@pytest.mark.parametrize(("journal", "same"), [("wal", True), ("delete", False)])
def test_sqlite_gives_each_task_one_snapshot_in_wal_mode(
    start_broker, tmp_path: Path, journal: str, same: bool
) -> None:
    broker = start_broker()
    database = broker.directory / "test.db"
    with sqlite3.connect(database) as db:
        db.execute(f"PRAGMA journal_mode = {journal}")
    db.close()
    writer = sqlite3.connect(database, check_same_thread=False)
    try:
        broker.stop()  # restart: workers open the file in its new journal mode
        broker.launch()

        def insert() -> None:
            with writer:
                writer.execute("INSERT INTO customer (name, blocked) VALUES ('new', 0)")

        counts = _counts_across_a_commit(broker, tmp_path, insert)
    finally:
        writer.close()
    assert (counts["first"] == counts["second"]) is same, counts


def test_a_statement_past_statement_timeout_fails_with_db_timeout_on_postgresql(
    start_broker, postgres: PostgresCluster
) -> None:
    broker = start_broker(
        {"Database": {"Url": postgres.owner_url, "StatementTimeout": "00:00:00.2"}}
    )
    with broker.connect() as session:
        error = session.open_page("P").enqueue_background_task(cu.DB_SLOW).exception(timeout=30)
    assert isinstance(error, BackgroundTaskError)
    assert error.code == "DB:Timeout", error


def test_a_statement_past_statement_timeout_fails_with_db_timeout_on_sqlite(start_broker) -> None:
    broker = start_broker({"Database": {"StatementTimeout": "00:00:00.2"}})
    with broker.connect() as session:
        error = session.open_page("P").enqueue_background_task(cu.DB_SLOW).exception(timeout=30)
    assert isinstance(error, BackgroundTaskError)
    assert error.code == "DB:Timeout", error


def test_a_deadlock_victim_fails_with_db_deadlock(start_broker, postgres: PostgresCluster) -> None:
    broker = start_broker({"Database": {"Url": postgres.owner_url}, "Workers": {"Count": "2"}})
    with broker.connect() as session:
        page = session.open_page("P")
        one = page.enqueue_background_task(cu.ADVISORY, {"first": "1", "second": "2"})
        two = page.enqueue_background_task(cu.ADVISORY, {"first": "2", "second": "1"})
        errors = [one.exception(timeout=30), two.exception(timeout=30)]
    codes = sorted(e.code if e else "completed" for e in errors)
    assert codes == ["DB:Deadlock", "completed"], errors


def test_a_lost_database_connection_fails_with_db_connection_lost(
    start_broker, postgres: PostgresCluster, tmp_path: Path
) -> None:
    broker = start_broker({"Database": {"Url": postgres.owner_url}, "Workers": {"Count": "1"}})
    started, go = tmp_path / "started", tmp_path / "go"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(
            cu.DB_TWICE, {"started": str(started), "go": str(go)}, timeout=60_000
        )
        wait_until(started.exists, timeout=30)
        with postgres.connect() as admin:  # the server drops the worker's connection
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pbt-server worker'"
            )
        go.write_text("1")
        error = task.exception(timeout=30)
        assert isinstance(error, BackgroundTaskError)
        assert error.code == "DB:ConnectionLost", error
        # the next task reconnects (and finds the file there: it reads at once)
        again = page.enqueue_background_task(cu.DB_TWICE, {"started": str(started), "go": str(go)})
        counts = again.result(timeout=30)
        assert counts["first"] == counts["second"]
