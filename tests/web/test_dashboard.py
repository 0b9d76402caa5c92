"""The live dashboard on ``MetricsAddress`` in headless Chromium, against a known load on a
real broker, and mounted in a Starlette app (``pbt_server.web.create_dashboard_app``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page
from starlette.applications import Starlette
from starlette.routing import Mount

from pbt_server.client import BackgroundTaskCanceled, BackgroundTaskError, ErrorLevel, connect
from pbt_server.config import load_config
from pbt_server.web import create_dashboard_app
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.support import wait_until
from tests.web.server import WebServer

# PBT_DASHBOARD_SCREENSHOT=/tmp/x.png keeps the screenshot of the loaded dashboard.
SCREENSHOT = os.environ.get("PBT_DASHBOARD_SCREENSHOT", "")


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    process = BrokerProcess.start(
        {"Server": {"MetricsAddress": "127.0.0.1:0"}, "Workers": {"Count": "2"}}
    )
    try:
        yield process
        assert process.stop() == 0, process.log_text()
    finally:
        process.cleanup()


def operator_status(broker: BrokerProcess) -> dict:
    with connect(str(broker.socket), operator=True) as session:
        return session.status()


def cells(page: Page, table: str, key: str, value: str) -> dict[str, str]:
    """The ``data-field`` cells of the row of ``table`` whose ``data-<key>`` is ``value``."""
    return page.evaluate(
        """([table, key, value]) => {
            const row = [...document.querySelectorAll(`#${table} tbody tr`)]
                .find((tr) => tr.dataset[key] === value);
            return row ? Object.fromEntries([...row.querySelectorAll("[data-field]")]
                .map((td) => [td.dataset.field, td.textContent])) : null;
        }""",
        [table, key, value],
    )


def wait_for(page: Page, predicate, timeout: float = 20) -> None:
    """Poll the page (it redraws every second) until ``predicate(page)`` holds."""
    wait_until(lambda: predicate(page), timeout=timeout, interval=0.1)


def test_the_dashboard_shows_a_known_load_and_follows_it_live(
    broker: BrokerProcess, context: BrowserContext
) -> None:
    address = operator_status(broker)["server"]["metrics"]
    a = connect(str(broker.socket))
    b = connect(str(broker.socket))
    try:
        page_a = a.open_page("A")
        for _ in range(5):
            assert page_a.enqueue_background_task(cu.NOOP).result(timeout=10) == {}
        for _ in range(2):
            task = page_a.enqueue_background_task(cu.RAISE, error_level=ErrorLevel.IGNORE)
            with pytest.raises(BackgroundTaskError):
                task.result(timeout=10)
        sleepers = [page_a.enqueue_background_task(cu.SLEEP, {"seconds": "60"}) for _ in range(2)]
        wait_until(
            lambda: (
                sum(w["task_seconds"] is not None for w in operator_status(broker)["workers"]) == 2
            ),
            timeout=20,
        )
        for _ in range(3):
            page_a.enqueue_background_task(cu.NOOP)
        page_b = b.open_page("B")
        for _ in range(4):
            page_b.enqueue_background_task(cu.NOOP)

        page = context.new_page()
        page.set_viewport_size({"width": 1200, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(f"http://{address}/")
        wait_for(page, lambda p: p.inner_text("#t-waiting") == "7")
        assert page.inner_text("#health") == "healthy"
        assert page.inner_text("#t-sessions") == "2"
        assert page.inner_text("#t-running") == "2"
        assert page.inner_text("#t-workers") == "2 / 2"
        assert cells(page, "sessions", "session", str(a.id)) == {
            "id": str(a.id),
            "pages": "1",
            "waiting": "3",
            "running": "2",
        }
        assert cells(page, "sessions", "session", str(b.id)) == {
            "id": str(b.id),
            "pages": "1",
            "waiting": "4",
            "running": "0",
        }
        status = operator_status(broker)
        for worker in status["workers"]:
            shown = cells(page, "workers", "slot", str(worker["slot"]))
            assert shown["pid"] == str(worker["pid"])
            if worker["slot"] == "standby":
                assert (shown["state"], shown["codeunit"], shown["task_seconds"]) == (
                    "idle",
                    "-",
                    "-",
                )
            else:
                assert shown["state"] == "busy"
                assert shown["codeunit"] == str(cu.SLEEP)
                assert shown["task"].startswith(f"s{a.id}/t")
                assert shown["task_seconds"].endswith(" s") or shown["task_seconds"].endswith("ms")
                assert shown["rss"].endswith("MiB")
        assert cells(page, "outcomes", "outcome", "completed") == {
            "outcome": "completed",
            "code": "-",
            "count": "5",
        }
        assert cells(page, "outcomes", "code", "ValueError")["count"] == "2"
        wait_for(page, lambda p: p.inner_text("#ended-all") == "5 completed, 2 error, 0 cancelled")
        times = cells(page, "times", "kind", "wait")  # the first wait row: all codeunits
        assert times["codeunit"] == "all"
        assert times["tasks"] == "7"  # the tasks that ended: 5 no-ops, 2 raises
        assert page.locator("#chart rect").count() > 0
        shot = page.screenshot(full_page=True)
        assert shot.startswith(b"\x89PNG")
        if SCREENSHOT:  # written here: a path= is written by a thread that outlives the test
            Path(SCREENSHOT).write_bytes(shot)

        # Live: cancel a sleeper; its worker is replaced and takes b's waiting no-ops.
        assert sleepers[0].cancel()
        with pytest.raises(BackgroundTaskCanceled):
            sleepers[0].result(timeout=10)
        wait_for(
            page, lambda p: (cells(p, "outcomes", "code", "Canceled") or {}).get("count") == "1"
        )
        wait_for(
            page, lambda p: (cells(p, "sessions", "session", str(b.id)) or {}).get("waiting") == "0"
        )
        wait_for(page, lambda p: "cancel 1" in p.inner_text("#kills"))
        assert errors == []
        page.close()
    finally:
        a.close()
        b.close()


def test_the_dashboard_mounts_in_a_starlette_app(broker: BrokerProcess, context: BrowserContext):
    config = load_config(broker.config, environ={})
    metrics = operator_status(broker)["server"]["metrics"]
    app = Starlette(routes=[Mount("/ops", create_dashboard_app(config, metrics=metrics))])
    server = WebServer(app)
    try:
        page = context.new_page()
        page.goto(f"{server.url}/ops/")
        wait_for(page, lambda p: p.inner_text("#health") == "healthy")
        assert page.inner_text("#t-sessions") == "0"
        page.close()
    finally:
        server.stop()
