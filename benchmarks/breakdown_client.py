"""The client process of ``benchmarks/breakdown.py``: run as a script, so that the
``pbt_server`` it imports is the one on ``PYTHONPATH`` (the tree being measured), not the
harness's own.

::

    PYTHONPATH=TREE python benchmarks/breakdown_client.py SOCKET sync|aio TASKS INFLIGHT WARMUP

It connects, opens a page and runs WARMUP no-op tasks, then prints ``ready``; for each
``go`` line on stdin it runs TASKS no-op tasks (sync: INFLIGHT threads, each sequential;
aio: INFLIGHT tasks in flight) and prints one JSON line: the seconds each task took, and
the window's elapsed seconds. ``stop`` (or EOF) ends it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

NOOP = 9001  # benchmarks/codeunits.py


def _report(samples: list[float], elapsed: float) -> None:
    print(json.dumps({"samples": samples, "elapsed": elapsed}), flush=True)


def sync_client(socket_path: str, tasks: int, threads: int, warmup: int) -> None:
    from pbt_server.client import connect

    with connect(socket_path) as session:
        page = session.open_page("Breakdown", "Breakdown: 1")
        for _ in range(warmup):
            page.enqueue_background_task(NOOP).result()
        print("ready", flush=True)
        while sys.stdin.readline().strip() == "go":
            samples: list[float] = []

            def lane(count: int, samples: list[float] = samples) -> None:
                clock = time.perf_counter
                for _ in range(count):
                    t0 = clock()
                    page.enqueue_background_task(NOOP).result()
                    samples.append(clock() - t0)

            started = time.perf_counter()
            if threads == 1:
                lane(tasks)
            else:
                lanes = [
                    threading.Thread(target=lane, args=(tasks // threads,)) for _ in range(threads)
                ]
                for thread in lanes:
                    thread.start()
                for thread in lanes:
                    thread.join()
            _report(samples, time.perf_counter() - started)


async def aio_client(socket_path: str, tasks: int, inflight: int, warmup: int) -> None:
    from pbt_server.client import aio

    session = await aio.connect(socket_path)
    try:
        page = await session.open_page("Breakdown", "Breakdown: 1")
        for _ in range(warmup):
            await (await page.enqueue_background_task(NOOP)).result()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            samples: list[float] = []

            async def lane(count: int, samples: list[float] = samples) -> None:
                clock = time.perf_counter
                for _ in range(count):
                    t0 = clock()
                    await (await page.enqueue_background_task(NOOP)).result()
                    samples.append(clock() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(lane(tasks // inflight) for _ in range(inflight)))
            _report(samples, time.perf_counter() - started)
    finally:
        await session.close()


def main(argv: list[str]) -> None:
    socket_path, flavour, tasks, inflight, warmup = argv
    if flavour == "sync":
        sync_client(socket_path, int(tasks), int(inflight), int(warmup))
    else:
        asyncio.run(aio_client(socket_path, int(tasks), int(inflight), int(warmup)))


if __name__ == "__main__":
    main(sys.argv[1:])
