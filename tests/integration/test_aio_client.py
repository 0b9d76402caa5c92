"""The asyncio client against a real broker: same semantics, awaitable."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pbt_server.client import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ConnectionLost,
    ErrorLevel,
)
from pbt_server.client.aio import Notification, connect
from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import wait_until


def test_aio_completion_error_and_triggers(broker):
    async def main() -> None:
        completed: list[tuple[int, dict[str, str]]] = []
        notes: list[Notification] = []
        all_completed, notified = asyncio.Event(), asyncio.Event()

        async def on_completed(task_id: int, results: dict[str, str]) -> None:
            await asyncio.sleep(0)  # an async trigger
            completed.append((task_id, results))
            if len(completed) == 10:
                all_completed.set()

        def on_notification(note: Notification) -> None:
            notes.append(note)
            notified.set()

        async with await connect(str(broker.socket)) as session:
            session.on_notification = on_notification
            page = await session.open_page("Dashboard")
            page.on_completed = on_completed
            tasks = [await page.enqueue_background_task(cu.ECHO, {"n": str(i)}) for i in range(10)]
            results = await asyncio.gather(*(task.result(timeout=10) for task in tasks))
            assert results == [{"n": str(i)} for i in range(10)]
            failing = await page.enqueue_background_task(
                cu.RAISE, {"message": "nope"}, error_level=ErrorLevel.WARNING
            )
            with pytest.raises(BackgroundTaskError) as caught:
                await failing.result(timeout=10)
            assert caught.value.code == "ValueError"
            async with asyncio.timeout(10):
                await all_completed.wait()
                await notified.wait()
            assert sorted(task_id for task_id, _ in completed) == list(range(1, 11))
            assert notes[0].severity is ErrorLevel.WARNING

    asyncio.run(main())


def test_aio_cancel_and_record_change(broker):
    async def main() -> None:
        async with await connect(str(broker.socket)) as session:
            page = await session.open_page("Card", record_id="A")
            running = await page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
            assert await running.cancel() is True
            with pytest.raises(BackgroundTaskCanceled):
                await running.result(timeout=5)
            old = await page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
            await page.set_record("B")
            with pytest.raises(BackgroundTaskCanceled) as caught:
                await old.result(timeout=5)
            assert caught.value.code == "RecordChanged"
            fresh = await page.enqueue_background_task(cu.CONTEXT)
            assert (await fresh.result(timeout=10))["record_id"] == "B"

    asyncio.run(main())


def test_aio_graceful_stop_cancels_pending_handles(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})

    async def main() -> None:
        session = await connect(str(broker.socket))
        page = await session.open_page("P")
        task = await page.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, broker.stop)
        assert code == 0
        with pytest.raises(BackgroundTaskCanceled) as caught:
            await task.result(timeout=10)
        assert caught.value.code == "ServerShuttingDown"
        with pytest.raises(ConnectionLost):
            await session.ping()
        await session.close()

    asyncio.run(main())


def test_aio_broker_killed_hard_fails_handles_with_connection_lost(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    workers = broker.worker_pids()

    async def main() -> None:
        session = await connect(str(broker.socket))
        page = await session.open_page("P")
        task = await page.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
        os.kill(broker.pid, signal.SIGKILL)
        with pytest.raises(ConnectionLost):
            await task.result(timeout=10)
        await session.close()

    asyncio.run(main())
    broker.process.wait(timeout=10)
    # PR_SET_PDEATHSIG: the workers died with their broker
    wait_until(lambda: not any(alive(pid) for pid in workers))


def test_aio_requests_of_one_loop_turn_go_out_in_order(broker):
    async def main() -> None:
        async with await connect(str(broker.socket)) as session:
            page = await session.open_page("P")
            # All twenty requests are written in one turn of the loop, in one write.
            tasks = await asyncio.gather(
                *(page.enqueue_background_task(cu.ECHO, {"i": str(i)}) for i in range(20))
            )
            assert [task.id for task in tasks] == list(range(1, 21))
            results = await asyncio.gather(*(task.result(timeout=10) for task in tasks))
            assert results == [{"i": str(i)} for i in range(20)]

    asyncio.run(main())


def test_aio_a_cancelled_waiter_leaves_the_others_waiting(broker):
    async def main() -> None:
        async with await connect(str(broker.socket)) as session:
            page = await session.open_page("P")
            task = await page.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
            cancelled = asyncio.create_task(task.result())
            other = asyncio.create_task(task.result())
            await asyncio.sleep(0)  # both wait now
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            with pytest.raises(TimeoutError):
                await task.result(timeout=0.01)  # a timed-out wait cancels nobody either
            assert (await asyncio.wait_for(other, 10))["slept"] == "0.3"

    asyncio.run(main())


def test_aio_large_results_arrive_over_many_reads(start_broker):
    broker = start_broker({"Server": {"MaxFrameBytes": str(4 << 20)}})

    async def main() -> None:
        async with await connect(str(broker.socket)) as session:
            page = await session.open_page("P")
            task = await page.enqueue_background_task(cu.BIG_RESULT, {"bytes": "2000000"})
            assert len((await task.result(timeout=20))["blob"]) == 2_000_000
            assert await (await page.enqueue_background_task(cu.NOOP)).result(timeout=10) == {}

    asyncio.run(main())
