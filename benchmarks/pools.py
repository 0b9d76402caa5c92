"""The baselines: ready-made process pools doing what each figure asks of pbt-server.

``ProcessPoolExecutor(2)`` and ``multiprocessing.Pool(2)`` with the fork context, and
``pebble.ProcessPool(2)`` with ``schedule(..., timeout=10)`` (its watchdog then active);
the work is the plain functions of ``benchmarks/work.py``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Final

from benchmarks import work
from benchmarks.cells import FORK
from benchmarks.timing import BenchError, Metrics, stats_ms, stats_us, time_calls

POOL_WORKERS: Final = 2
PEBBLE_TIMEOUT: Final = 10.0  # seconds: "pebble with a timeout" (its watchdog is then active)

Submit = Callable[[], Callable[[], object]]  # submit a no-op; returns "wait for its result"


@contextlib.contextmanager
def pool(kind: str) -> Iterator[Submit]:
    if kind == "ppe":
        with ProcessPoolExecutor(POOL_WORKERS, mp_context=FORK) as executor:
            yield lambda: executor.submit(work.noop, 0).result
    elif kind == "pebble":
        import pebble  # the bench extra; imported where used, so the figures load without it

        pebble_pool = pebble.ProcessPool(max_workers=POOL_WORKERS, context=FORK)
        try:
            yield lambda: pebble_pool.schedule(work.noop, args=(0,), timeout=PEBBLE_TIMEOUT).result
        finally:
            pebble_pool.close()
            pebble_pool.join()
    elif kind == "mp-pool":
        with FORK.Pool(POOL_WORKERS) as mp_pool:
            yield lambda: mp_pool.apply_async(work.noop, (0,)).get
    else:
        raise ValueError(kind)


def latency_pool(kind: str, n: int, warmup: int) -> Metrics:
    with pool(kind) as submit:
        return stats_us(time_calls(lambda: submit()(), n, warmup))


def throughput_pool(kind: str, total: int, warmup: int) -> Metrics:
    """Submit all, then wait for all."""
    with pool(kind) as submit:
        for _ in range(warmup):
            submit()()
        t0 = time.monotonic()
        waits = [submit() for _ in range(total)]
        for wait in waits:
            wait()
        t1 = time.monotonic()
    return {"tasks_per_s": total / (t1 - t0), "tasks": total, "seconds": t1 - t0}


def timeout_pebble(n: int, timeout_ms: int) -> Metrics:
    """TimeoutError raised - submit - the timeout, with pebble's own timeout."""
    import pebble

    samples = []
    pebble_pool = pebble.ProcessPool(max_workers=POOL_WORKERS, context=FORK)
    try:
        for _ in range(n):
            pebble_pool.schedule(work.noop, args=(0,)).result()  # a live worker is waiting
            time.sleep(0.05)
            submitted = time.perf_counter()
            future = pebble_pool.schedule(work.spin, timeout=timeout_ms / 1000)
            try:
                future.result(timeout=10)
            except TimeoutError:
                raised = time.perf_counter()
            else:
                raise BenchError("pebble: the spinning task returned")
            samples.append(raised - submitted - timeout_ms / 1000)
    finally:
        pebble_pool.stop()
        pebble_pool.join()
    return stats_ms("", samples)


def storm_ppe(tabs: int, period_ms: float, switches: int, query_ms: float) -> Metrics:
    """The cancel storm as a web application does it with one ProcessPoolExecutor(2).

    Every ``period_ms`` each tab moves to another record and submits that record's query.
    The stale query is cancelled if it is still queued; a running one cannot be stopped (the
    executor has no way to), so it runs to its end and the tab drops its result. Measured:
    from each tab's last record change to its last query's result.
    """
    done_at: dict[Future[int], float] = {}

    def stamp(future: Future[int]) -> None:
        done_at[future] = time.perf_counter()

    with ProcessPoolExecutor(POOL_WORKERS, mp_context=FORK) as executor:
        wait_futures([executor.submit(work.noop, 0) for _ in range(2 * POOL_WORKERS)])
        submitted: list[Future[int]] = []
        current: list[Future[int] | None] = [None] * tabs
        last_change = [0.0] * tabs
        start = time.perf_counter()
        for i in range(switches):
            delay = start + i * period_ms / 1000 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for tab in range(tabs):
                stale = current[tab]
                if stale is not None:
                    stale.cancel()  # False once it runs: it finishes, and is dropped
                last_change[tab] = time.perf_counter()
                future = executor.submit(work.busy, query_ms)
                future.add_done_callback(stamp)
                submitted.append(future)
                current[tab] = future
        storm_s = time.perf_counter() - start
        finals = [f for f in current if f is not None]
        wait_futures(finals, timeout=120)
        ran = sum(1 for f in submitted if not f.cancelled())
    latencies = [done_at[f] - last_change[tab] for tab, f in enumerate(finals)]
    return stats_ms("", latencies) | {
        "queries_run": ran,
        "queries_submitted": len(submitted),
        "storm_s": storm_s,
        "kills": 0,
    }


def fairness_ppe(depth: int, n: int, warmup: int, busy_ms: float) -> Metrics:
    """One submitter keeps ``depth`` tasks queued; another submits single no-ops, each at a
    random moment (untimed pause of up to one busy task), and times their round trip."""
    with ProcessPoolExecutor(POOL_WORKERS, mp_context=FORK) as executor:
        busy: list[Future[None]] = []

        pause = random.Random(1)

        def top_up() -> None:
            time.sleep(pause.uniform(0, busy_ms / 1000))  # a click at a random moment
            busy[:] = [f for f in busy if not f.done()]
            while len(busy) < depth:
                busy.append(executor.submit(work.sleep, busy_ms / 1000))

        samples = time_calls(lambda: executor.submit(work.noop, 0).result(), n, warmup, top_up)
        for future in busy:
            future.cancel()
    return stats_ms("", samples)
