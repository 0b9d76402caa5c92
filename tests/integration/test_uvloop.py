"""uvloop (uvicorn's loop with ``uvicorn[standard]``): the asyncio client and the broker run on it.

uvloop's transports do not subclass ``asyncio.Transport``; both ends used to assert they did.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
import uvloop

from pbt_server.client import BackgroundTaskCanceled
from pbt_server.client.aio import connect
from tests import codeunits as cu
from tests.broker_process import BrokerProcess


class UvloopBroker(BrokerProcess):
    RUNNER: ClassVar[tuple[str, ...]] = (
        "-c",
        "import asyncio, sys, uvloop\n"
        "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
        "from pbt_server.cli import main\n"
        "sys.exit(main(sys.argv[1:]))",
    )


async def _round_trips(socket: str) -> None:
    async with await connect(socket) as session:
        page = await session.open_page("Card", record_id="A")
        completed: list[int] = []
        page.on_completed = lambda task_id, results: completed.append(task_id)
        task = await page.enqueue_background_task(cu.ECHO, {"n": "1"})
        assert await task.result(timeout=10) == {"n": "1"}
        running = await page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        assert await running.cancel() is True
        with pytest.raises(BackgroundTaskCanceled):
            await running.result(timeout=5)
        await session.ping()
        assert completed == [task.id]


def test_aio_client_runs_on_uvloop(broker):
    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await _round_trips(str(broker.socket))

    uvloop.run(main())


def test_broker_runs_on_uvloop():
    broker = UvloopBroker.start()
    try:
        asyncio.run(_round_trips(str(broker.socket)))
        assert broker.stop() == 0, broker.log_text()
    finally:
        broker.cleanup()
