"""A tab is a parent session: closing it ends the session; a network blip does not."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette

from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import wait_until
from tests.web.conftest import DemoBroker, make_app, web_config
from tests.web.harness import broker_sessions, busy_worker, enqueue, open_test_page
from tests.web.proxy import CuttableProxy
from tests.web.server import WebServer

GRACE_MS = 3000


@pytest.fixture(scope="module")
def long_grace_web(demo_broker: DemoBroker) -> Iterator[WebServer]:
    """A 30 s grace: a session that ends sooner was ended by the tab, not by the timer."""
    server = WebServer(_app(demo_broker, 30_000))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxied(demo_broker: DemoBroker) -> Iterator[tuple[WebServer, CuttableProxy]]:
    server = WebServer(_app(demo_broker, GRACE_MS))
    proxy = CuttableProxy(server.port)
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.stop()


def _app(demo: DemoBroker, grace_ms: int) -> Starlette:
    return make_app(web_config(demo.broker, reconnect_grace_ms=grace_ms))


@pytest.mark.parametrize("pagehide", [True, False], ids=["pagehide", "socket-close-only"])
def test_closing_the_tab_kills_its_running_task_at_once(
    demo_broker: DemoBroker, long_grace_web: WebServer, context, pagehide: bool
):
    broker = demo_broker.broker
    page, session_id = open_test_page(context, long_grace_web.url)
    if not pagehide:  # only the WebSocket's close tells the server
        page.evaluate("removeEventListener('pagehide', session._leave)")
    task_id = enqueue(page, cu.SLEEP, {"seconds": "60"})
    pid = busy_worker(broker, session_id, task_id)
    closed = time.monotonic()
    page.close()
    wait_until(lambda: not alive(pid), timeout=10)
    elapsed = time.monotonic() - closed
    # Well inside the 30 s grace: the tab's goodbye ended the session, not the timer.
    assert elapsed < 10, f"worker killed {elapsed:.2f} s after the tab closed"
    assert session_id not in broker_sessions(broker)
    broker.wait_workers_replaced(pid)


def test_reconnect_inside_the_grace_window_keeps_the_task(
    demo_broker: DemoBroker, proxied: tuple[WebServer, CuttableProxy], context
):
    server, proxy = proxied
    page, session_id = open_test_page(context, proxy.url)
    task_id = enqueue(page, cu.SLEEP, {"seconds": "1"})
    busy_worker(demo_broker.broker, session_id, task_id)
    proxy.cut(stay_down=True)
    bridge = server.bridge
    tab = next(iter(bridge.tabs.values()))
    wait_until(lambda: tab.socket is None)  # the server saw the drop: the grace runs
    wait_until(lambda: page.evaluate("!session._ready"))  # and so did the browser
    # The task completes while the network is down; its outcome waits in the tab.
    wait_until(lambda: not any(w["task"] for w in demo_broker.broker.status()["workers"]))
    proxy.up()
    page.wait_for_function("h.completed.length === 1", timeout=GRACE_MS * 2)
    [[completed_id, results]] = page.evaluate("h.completed")
    assert completed_id == task_id
    assert results["slept"] == "1"
    assert page.evaluate("session.id") == session_id
    assert page.evaluate("h.closed") == []
    assert proxy.connections >= 2  # it did reconnect
    assert session_id in broker_sessions(demo_broker.broker)
    # The session goes on as before.
    assert enqueue(page, cu.ECHO, {"a": "b"}) == task_id + 1
    page.wait_for_function("h.completed.length === 2", timeout=10_000)
    page.close()


def test_reconnect_after_the_grace_window_finds_the_session_ended(
    demo_broker: DemoBroker, proxied: tuple[WebServer, CuttableProxy], context
):
    _, proxy = proxied
    broker = demo_broker.broker
    page, session_id = open_test_page(context, proxy.url)
    task_id = enqueue(page, cu.SLEEP, {"seconds": "60"})
    pid = busy_worker(broker, session_id, task_id)
    proxy.cut(stay_down=True)
    # After the grace window the bridge closes the session: the worker is killed.
    wait_until(lambda: not alive(pid), timeout=GRACE_MS / 1000 + 10)
    assert session_id not in broker_sessions(broker)
    proxy.up()
    page.wait_for_function("h.closed.length === 1", timeout=GRACE_MS * 3)
    [code] = page.evaluate("h.closed")
    assert code in ("ConnectionLost", "SessionExpired")
    assert page.evaluate("h.completed") == []
    assert page.evaluate("session.closed") is True
    # A new session can be had (pbt.connect() no longer returns the ended one).
    new_id = page.evaluate("pbt.connect().then((s) => s.id)")
    assert new_id != session_id
    broker.wait_workers_replaced(pid)
    page.close()
