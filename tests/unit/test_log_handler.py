"""The broker's queue handler: records logged in the event loop wait a little, never lost or
reordered (pbt_server/logs.py)."""

from __future__ import annotations

import asyncio
import logging
import queue
from pathlib import Path

from pbt_server.logs import BrokerLogging, LoopQueueHandler
from tests.support import wait_until


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test.loop_queue.{id(handler)}")
    log.propagate = False
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    return log


def _messages(records: queue.SimpleQueue[logging.LogRecord]) -> list[str]:
    found = []
    while not records.empty():
        found.append(records.get_nowait().getMessage())
    return found


class _Arrivals(queue.SimpleQueue[logging.LogRecord]):
    """A record queue that also wakes an asyncio waiter (the listener thread's stand-in)."""

    arrived: asyncio.Event | None = None

    def put_nowait(self, item: logging.LogRecord) -> None:
        super().put_nowait(item)
        if self.arrived is not None:
            self.arrived.set()


def test_records_logged_in_the_loop_are_handed_on_after_the_callback_in_order() -> None:
    records = _Arrivals()
    log = _logger(LoopQueueHandler(records))

    async def main() -> list[str]:
        records.arrived = asyncio.Event()
        log.warning("first %d", 1)
        log.warning("second")
        held = _messages(records)  # nothing yielded to the loop since: both are held
        assert held == []
        await asyncio.wait_for(records.arrived.wait(), timeout=5)
        return _messages(records)

    assert asyncio.run(main()) == ["first 1", "second"]


def test_a_record_held_when_the_loop_ends_goes_out_before_the_next_one() -> None:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    log = _logger(LoopQueueHandler(records))

    async def main() -> None:
        log.error("the last word of the loop")  # its release never runs: the loop ends

    asyncio.run(main())
    assert _messages(records) == []
    log.error("after the loop")
    assert _messages(records) == ["the last word of the loop", "after the loop"]


def test_stopping_the_broker_logging_writes_what_the_loop_held(tmp_path: Path) -> None:
    path = tmp_path / "pbt.log"
    logs = BrokerLogging(path, "INFO", to_stderr=False)
    try:

        async def main() -> None:
            logging.getLogger("pbt_server.test").warning("logged just before the loop ended")

        asyncio.run(main())
    finally:
        logs.close()
    wait_until(lambda: "logged just before the loop ended" in path.read_text(), timeout=5)
