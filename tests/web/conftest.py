"""Fixtures of the browser tests: a broker with the demo database, the web app, Chromium."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Playwright, sync_playwright
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from pbt_server.config import ServerConfig, load_config
from pbt_server.demo import create_database
from pbt_server.demo_ids import DEMO_CODEUNITS
from pbt_server.web import Access
from pbt_server.web.demo import create_demo_app
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.web import codeunits as web_cu
from tests.web.server import CHROMIUM, CHROMIUM_ARGS, WebServer

CUSTOMERS = 300
UNREGISTERED = 4242  # allowed to the test user, registered nowhere
ALLOWED = DEMO_CODEUNITS | {
    cu.NOOP,
    cu.ECHO,
    cu.SLEEP,
    cu.RAISE,
    cu.PROGRESS,
    web_cu.CONTEXT_MAP,
    UNREGISTERED,
}
TEST_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>pbt test page</title>
<script src="/pbt/pbt.js"></script></head><body><p id="status">test page</p></body></html>"""


def test_authorize(request: HTTPConnection) -> Access | None:
    """Cookie ``user``: absent = alice; ``nobody`` = refused."""
    user = request.cookies.get("user", "alice")
    if user == "nobody":
        return None
    return Access(codeunits=ALLOWED, context={"user": user, "company": "CRONUS"})


async def test_page(request: Request) -> HTMLResponse:
    return HTMLResponse(TEST_PAGE)


@dataclasses.dataclass
class DemoBroker:
    broker: BrokerProcess
    database: Path

    def blocked(self) -> int:
        with sqlite3.connect(f"{self.database.as_uri()}?mode=ro", uri=True) as db:
            (count,) = db.execute("SELECT count(*) FROM customer WHERE blocked <> ''").fetchone()
        db.close()
        return int(count)


@pytest.fixture(scope="module")
def demo_broker() -> Iterator[DemoBroker]:
    directory = Path(tempfile.mkdtemp(prefix="pbt-webdb-", dir="/tmp"))
    database = directory / "demo.db"
    create_database(database, customers=CUSTOMERS)
    broker = BrokerProcess.start(
        {
            "Codeunits": {"Modules": "workers.demo tests.codeunits tests.web.codeunits"},
            "Database": {"Url": f"sqlite:///{database}"},
        }
    )
    try:
        yield DemoBroker(broker, database)
        assert broker.stop() == 0, broker.log_text()
    finally:
        broker.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def web_config(broker: BrokerProcess, **web: Any) -> ServerConfig:
    config = load_config(broker.config, environ={})
    return dataclasses.replace(config, web=dataclasses.replace(config.web, **web))


def make_app(config: ServerConfig) -> Starlette:
    app = create_demo_app(config, authorize=test_authorize)
    app.router.routes.append(Route("/test", test_page))
    return app


@pytest.fixture
def start_web() -> Iterator[Callable[..., WebServer]]:
    """Start web servers for a test; all are stopped at its end."""
    servers: list[WebServer] = []

    def start(config: ServerConfig) -> WebServer:
        server = WebServer(make_app(config), ws_max_size=4 * config.web.max_message_bytes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def web(demo_broker: DemoBroker) -> Iterator[WebServer]:
    """One web app for a module's tests, on the module's broker, 1.5 s grace."""
    config = web_config(demo_broker.broker, reconnect_grace_ms=1500)
    server = WebServer(make_app(config), ws_max_size=4 * config.web.max_message_bytes)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    # Module-scoped: while it runs, Playwright's sync API holds this thread's event loop,
    # and asyncio.run() (other modules' tests) refuses to start.
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Debian's Chromium, never a downloaded one; launch() gives it a fresh user-data dir.
    chromium = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A browser profile of its own for one test: no cookies or tabs from another."""
    context = browser.new_context()
    try:
        yield context
    finally:
        context.close()
