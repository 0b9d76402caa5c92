"""uvloop (``[Server] EventLoop``, the ``fast`` extra; uvicorn's loop with ``uvicorn[standard]``):
the broker and the asyncio client run on it, and the broker still runs on asyncio's own loop.

uvloop's transports do not subclass ``asyncio.Transport``; both ends used to assert they did.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from pbt_server.client import BackgroundTaskCanceled
from pbt_server.client.aio import connect
from tests import codeunits as cu


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


@pytest.mark.parametrize("choice", ["uvloop", "asyncio", "auto"])
def test_broker_runs_on_the_event_loop_its_config_names(start_broker, choice):
    broker = start_broker({"Server": {"EventLoop": choice}})
    asyncio.run(_round_trips(str(broker.socket)))
    expected = "asyncio" if choice == "asyncio" else "uvloop"  # installed here: auto takes it
    broker.wait_for_log(f"event loop: {expected}\n")
