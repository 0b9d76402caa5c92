"""``/health`` answers instead of hanging when the broker's loop does not: a real HTTP server
and a real event loop (in a thread) that the test wedges; of the broker only the few
attributes the endpoint reads. (The healthy broker is tested end to end in
``tests/integration/test_metrics.py``.)"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pbt_server.config import ServerConfig, load_config
from pbt_server.operations import SNAPSHOT_TIMEOUT, OperationsServer
from pbt_server.sessions import Scheduler
from tests.scrape import get


@dataclass
class Pool:
    slots: list[None] = field(default_factory=lambda: [None, None])  # no worker in either
    standby: None = None
    ended: dict[str, int] = field(default_factory=dict)


@dataclass
class Listeners:
    def tcp_text(self) -> str:
        return ""


@dataclass
class Broker:
    config: ServerConfig
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    pool: Pool = field(default_factory=Pool)
    listeners: Listeners = field(default_factory=Listeners)
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)
    max_sessions: int = 10


@pytest.fixture
def endpoint() -> Iterator[tuple[OperationsServer, Broker]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    config = load_config(None, environ={})
    broker = Broker(config, loop, Scheduler(config.asynchronous_processing, set()))
    server = OperationsServer(broker, ("127.0.0.1", 0))  # type: ignore[arg-type]
    server.start()
    try:
        yield server, broker
    finally:
        server.close()
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        if not loop.is_closed():
            loop.close()


def test_health_names_the_empty_worker_slots(endpoint) -> None:
    server, _ = endpoint
    status, content_type, text = get(server.address_text, "/health")
    assert (status, content_type) == (503, "text/plain")
    assert text == "unhealthy: worker slot(s) [0, 1] have no worker (a worker cannot boot?)\n"


def test_health_fails_within_its_timeout_when_the_loop_is_wedged(endpoint) -> None:
    server, broker = endpoint
    release = threading.Event()
    broker.loop.call_soon_threadsafe(release.wait, 30)  # the loop runs nothing else meanwhile
    try:
        started = time.monotonic()
        status, _, text = get(server.address_text, "/health")
        took = time.monotonic() - started
        assert status == 503
        assert (
            text
            == f"unhealthy: the broker's event loop did not answer within {SNAPSHOT_TIMEOUT:g} s\n"
        )
        assert took < SNAPSHOT_TIMEOUT + 5  # bounded, not a hang
        status, _, text = get(server.address_text, "/metrics")
        assert status == 503
        assert "did not answer" in text
    finally:
        release.set()


def test_health_says_when_the_loop_is_gone(endpoint) -> None:
    server, broker = endpoint
    loop = broker.loop
    loop.call_soon_threadsafe(loop.stop)
    while loop.is_running():
        time.sleep(0.005)
    loop.close()
    status, _, text = get(server.address_text, "/health")
    assert (status, text) == (503, "unhealthy: the broker's event loop has stopped\n")


def test_unknown_paths_are_404_and_head_has_no_body(endpoint) -> None:
    server, _ = endpoint
    assert get(server.address_text, "/nope")[0] == 404
    host, port = server.address_text.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("HEAD", "/health")
        response = connection.getresponse()
        assert response.status == 503
        assert int(response.headers["Content-Length"]) > 0
        assert response.read() == b""
    finally:
        connection.close()
    status, content_type, body = get(server.address_text, "/dashboard.js")
    assert (status, content_type) == (200, "text/javascript; charset=utf-8")
    assert "api/status" in body
