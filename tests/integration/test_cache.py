"""The result cache: served while the data has not changed, run again as soon as it has."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.broker_process import BrokerProcess, make_database
from tests.support import wait_until


def runs(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


@pytest.fixture(params=["wal", "delete"])
def cached_broker(request, start_broker, tmp_path) -> tuple[BrokerProcess, Path]:
    database = tmp_path / "data.db"
    make_database(database)
    with sqlite3.connect(database) as db:
        db.execute(f"PRAGMA journal_mode = {request.param}")
    db.close()
    return start_broker({"Database": {"Url": f"sqlite:///{database}"}}), database


def block_one_more(database: Path) -> None:
    db = sqlite3.connect(database)
    with db:
        db.execute(
            "UPDATE customer SET blocked = 1"
            " WHERE id = (SELECT min(id) FROM customer WHERE blocked = 0)"
        )
    db.close()


def test_a_cached_result_serves_until_the_data_changes(cached_broker, tmp_path) -> None:
    broker, database = cached_broker
    ran = tmp_path / "runs"
    params = {"runs": str(ran)}
    with broker.connect() as session:
        page = session.open_page("Role Center")
        first = page.enqueue_background_task(cu.CACHED, params).result(timeout=20)
        assert runs(ran) == 1
        again = page.enqueue_background_task(cu.CACHED, params)
        assert again.result(timeout=20) == first  # served: nothing ran
        assert again.id == 2
        assert runs(ran) == 1
        other = session.open_page("Cue")  # another page, another session: the same entry
        with broker.connect() as second:
            assert (
                second.open_page("Cue").enqueue_background_task(cu.CACHED, params).result(20)
                == first
            )
        assert other.enqueue_background_task(cu.CACHED, params).result(timeout=20) == first
        assert runs(ran) == 1

        block_one_more(database)  # a write through another connection
        changed = page.enqueue_background_task(cu.CACHED, params).result(timeout=20)
        assert runs(ran) == 2
        assert int(changed["blocked"]) == int(first["blocked"]) + 1
        assert page.enqueue_background_task(cu.CACHED, params).result(timeout=20) == changed
        assert runs(ran) == 2
    cache = broker.status()["totals"]["cache"]
    assert cache["hits"] == 4
    assert cache["misses"] == 2
    assert cache["entries"] == 1


def test_errors_are_never_cached(cached_broker, tmp_path) -> None:
    broker, _ = cached_broker
    ran = tmp_path / "runs"
    params = {"runs": str(ran), "fail": "not today"}
    with broker.connect() as session:
        page = session.open_page("Cue")
        for expected_runs in (1, 2):
            with pytest.raises(BackgroundTaskError):
                page.enqueue_background_task(cu.CACHED, params).result(timeout=20)
            assert runs(ran) == expected_runs


def test_max_age_bounds_an_entry_however_still_the_data(cached_broker, tmp_path) -> None:
    broker, _ = cached_broker
    ran = tmp_path / "runs"
    params = {"runs": str(ran)}
    with broker.connect() as session:
        page = session.open_page("Cue")
        page.enqueue_background_task(cu.CACHED_BRIEFLY, params).result(timeout=20)
        made = time.monotonic()
        page.enqueue_background_task(cu.CACHED_BRIEFLY, params).result(timeout=20)
        assert runs(ran) == 1 or time.monotonic() - made > 0.3  # served, unless already old
        wait_until(lambda: time.monotonic() - made > 0.35)
        page.enqueue_background_task(cu.CACHED_BRIEFLY, params).result(timeout=20)
        assert runs(ran) == 2
