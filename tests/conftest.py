from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.broker_process import BrokerProcess
from tests.support import wait_until


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every client thread a test started must be gone when it ends."""
    before = set(threading.enumerate())
    yield
    wait_until(lambda: not (set(threading.enumerate()) - before), timeout=10)


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerProcess]:
    """One broker shared by a module's tests (each test opens its own sessions)."""
    process = BrokerProcess.start()
    try:
        yield process
        assert process.stop() == 0, process.log_text()
    finally:
        process.cleanup()


@pytest.fixture
def start_broker() -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with their own settings; all are stopped and checked at the end."""
    started: list[BrokerProcess] = []

    def start(settings: dict[str, dict[str, str]] | None = None, **kw: Any) -> BrokerProcess:
        process = BrokerProcess.start(settings, **kw)
        started.append(process)
        return process

    yield start
    try:
        for process in started:
            running = process.process is not None and process.process.poll() is None
            code = process.stop()  # also checks that no worker outlived its broker
            if running:
                assert code == 0, process.log_text()
    finally:
        for process in started:
            process.cleanup()
