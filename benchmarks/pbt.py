"""pbt-server's side of each figure: measurements through the real clients against a broker
started by the runner (its socket path, and where asked its pid and log, passed in)."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from benchmarks.codeunits import BUSY, NOOP, SLEEP, SPIN
from benchmarks.load import Call, throughput_clients
from benchmarks.timing import (
    BenchError,
    Metrics,
    percentile,
    stats_ms,
    stats_us,
    time_calls,
    time_calls_async,
    wait_for,
)
from pbt_server.client import BackgroundTask, Page, Session, aio, connect

# --- helpers -------------------------------------------------------------------------------


def _workers(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slot workers (not the standby spare)."""
    return [w for w in status["workers"] if w["slot"] != "standby"]


def _all_idle(status: Mapping[str, Any], count: int) -> bool:
    """``count`` slot workers idle, and the standby spare booted (steady state)."""
    workers = _workers(status)
    standby = [w for w in status["workers"] if w["slot"] == "standby"]
    return (
        len(workers) == count
        and all(w["state"] == "idle" for w in workers)
        and [w["state"] for w in standby] == ["idle"]
    )


def _wait_idle(session: Session, count: int) -> None:
    wait_for("idle workers", lambda: _all_idle(session.status(), count))


class Marker:
    """File names for the SLEEP codeunit's "I am running" file (see benchmarks/codeunits.py)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pbt-bench-mark-", dir="/tmp")
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return os.path.join(self.directory, f"started-{self.count}")

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_started(path: str) -> int:
    """Wait until the SLEEP task that got ``path`` runs; return its worker's pid."""

    def read() -> int | None:
        try:
            with open(path) as f:
                return int(f.read())
        except FileNotFoundError:
            return None

    pid: int = wait_for(f"the task of {path} to run", read)
    return pid


def _open_page(session: Session) -> Page:
    return session.open_page("Bench", "Bench: 1")


# --- latency ---------------------------------------------------------------------------------


def latency_pbt_sync(socket_path: str, n: int, warmup: int) -> Metrics:
    with connect(socket_path) as session:
        page = _open_page(session)
        return stats_us(time_calls(lambda: page.enqueue_background_task(NOOP).result(), n, warmup))


def latency_pbt_aio(socket_path: str, n: int, warmup: int) -> Metrics:
    async def main() -> list[float]:
        session = await aio.connect(socket_path)
        try:
            page = await session.open_page("Bench", "Bench: 1")

            async def call() -> None:
                await (await page.enqueue_background_task(NOOP)).result()

            return await time_calls_async(call, n, warmup)
        finally:
            await session.close()

    return stats_us(asyncio.run(main()))


# --- throughput ----------------------------------------------------------------------------


async def _open_pbt(address: str) -> tuple[Call, Call]:
    session = await aio.connect(address)
    page = await session.open_page("Bench", "Bench: 1")

    async def one() -> None:
        await (await page.enqueue_background_task(NOOP)).result()

    return one, session.close


def throughput_pbt(socket_path: str, sessions: int, total: int) -> Metrics:
    return throughput_clients(_open_pbt, socket_path, sessions, total)


# --- timeout precision -----------------------------------------------------------------------


def timeout_pbt(
    socket_path: str, n: int, timeout_ms: int, codeunit: int = SPIN, stack: str = ""
) -> Metrics:
    """Error arrival - enqueue reply arrival - the timeout (the worker's ack is not visible).

    Before the kill the broker takes the stuck code's stack; every error's call stack must
    contain ``stack`` (so the figure is known to measure the path it names)."""
    samples, sizes = [], []
    with connect(socket_path) as session:
        page = _open_page(session)
        for _ in range(n):
            _wait_idle(session, 2)
            task = page.enqueue_background_task(codeunit, timeout=timeout_ms)
            replied = time.perf_counter()
            error = task.exception(timeout=10)
            arrived = time.perf_counter()
            if error is None or getattr(error, "code", "") != "ChildSessionTaskTimeout":
                raise BenchError(f"expected ChildSessionTaskTimeout, got {error!r}")
            call_stack = str(getattr(error, "call_stack", ""))
            if stack not in call_stack:
                raise BenchError(f"the timeout's call stack lacks {stack!r}: {call_stack!r}")
            samples.append(arrived - replied - timeout_ms / 1000)
            sizes.append(len(call_stack.encode()))
        _wait_idle(session, 2)
    return stats_ms("", samples) | {"stack_bytes": percentile(sizes, 50)}


# --- cancel -> slot free -----------------------------------------------------------------------


def cancel_pbt(socket_path: str, n: int, rtt_n: int) -> Metrics:
    """MaxConcurrency 1: cancel A (running) -> B (waiting, same session) completes."""
    with connect(socket_path) as session:
        page = _open_page(session)
        _wait_idle(session, 2)
        rtts = time_calls(lambda: page.enqueue_background_task(NOOP).result(), rtt_n, 20)
        rtt = percentile(rtts, 50)
        totals, calls = [], []
        marker = Marker()
        for _ in range(n):
            _wait_idle(session, 2)
            started = marker.next()
            running = page.enqueue_background_task(SLEEP, {"seconds": "30", "started": started})
            waiting = page.enqueue_background_task(NOOP)
            _wait_started(started)
            t0 = time.perf_counter()
            if not running.cancel():
                raise BenchError("cancel() returned False")
            t1 = time.perf_counter()
            waiting.result(timeout=10)
            t2 = time.perf_counter()
            totals.append(t2 - t0)
            calls.append(t1 - t0)
        _wait_idle(session, 2)
        marker.close()
    metrics = stats_ms("", [t - rtt for t in totals])
    metrics |= {
        "raw_p50_ms": percentile(totals, 50) * 1e3,
        "cancel_call_p50_ms": percentile(calls, 50) * 1e3,
        "noop_rtt_ms": rtt * 1e3,
    }
    return metrics


# --- kill + replace ----------------------------------------------------------------------------


def kill_pbt(socket_path: str, n: int) -> Metrics:
    """Count 1: SIGKILL the busy worker; crash error; then a no-op on its replacement."""
    to_error, to_noop, totals = [], [], []
    with connect(socket_path) as session:
        page = _open_page(session)
        _wait_idle(session, 1)
        for _ in range(20):
            page.enqueue_background_task(NOOP).result()
        marker = Marker()
        for _ in range(n):
            _wait_idle(session, 1)
            started = marker.next()
            task = page.enqueue_background_task(SLEEP, {"seconds": "30", "started": started})
            pid = _wait_started(started)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            error = task.exception(timeout=10)
            t1 = time.perf_counter()
            if error is None or getattr(error, "code", "") != "ChildSessionCrashed":
                raise BenchError(f"expected ChildSessionCrashed, got {error!r}")
            page.enqueue_background_task(NOOP).result(timeout=10)
            t2 = time.perf_counter()
            to_error.append(t1 - t0)
            to_noop.append(t2 - t1)
            totals.append(t2 - t0)
        _wait_idle(session, 1)
        marker.close()
    return stats_ms("", totals) | stats_ms("error_", to_error) | stats_ms("noop_", to_noop)


# --- scale ------------------------------------------------------------------------------------


def scale_pbt(socket_path: str, depths: Sequence[int], batch: int, sequential: int) -> Metrics:
    """Enqueue cost with ``depth`` tasks waiting (Count 1 busy, MaxConcurrency 1)."""

    async def main() -> Metrics:
        metrics: Metrics = {}
        session = await aio.connect(socket_path)
        page = await session.open_page("Bench", "Bench: 1")

        async def enqueue(k: int) -> None:
            await asyncio.gather(*(page.enqueue_background_task(NOOP) for _ in range(k)))

        marker = Marker()
        started = marker.next()
        parameters = {"seconds": "3600", "started": started}
        await page.enqueue_background_task(SLEEP, parameters, timeout=600_000)
        _wait_started(started)  # blocks the loop briefly: nothing else is due yet
        marker.close()
        waiting = 0
        clock = time.perf_counter
        for depth in depths:
            while waiting < depth:
                k = min(1000, depth - waiting)
                await enqueue(k)
                waiting += k
            # The figure is the broker's: keep this process's own gen-2 collections over
            # 10^5 task handles (up to ~0.5 s each) out of it. Reported in the README.
            gc.collect()
            gc.freeze()
            one_by_one = []
            for _ in range(sequential):
                t0 = clock()
                await page.enqueue_background_task(NOOP)
                one_by_one.append(clock() - t0)
            t0 = clock()
            await enqueue(batch)
            elapsed = clock() - t0
            waiting += sequential + batch
            metrics[f"batch_us@{depth}"] = elapsed / batch * 1e6
            metrics[f"seq_p50_us@{depth}"] = percentile(one_by_one, 50) * 1e6
        # How long the broker is busy when a session with that many waiting tasks closes.
        t0 = clock()
        await session.close()
        probe = await aio.connect(socket_path, timeout=120)
        await probe.ping()
        metrics["close_ms"] = (clock() - t0) * 1e3
        metrics["waiting_at_close"] = waiting
        await probe.close()
        return metrics

    return asyncio.run(main())


# --- rss ----------------------------------------------------------------------------------------


def rss_pbt(socket_path: str, broker_pid: int, sessions: int) -> Metrics:
    async def main() -> Metrics:
        broker = psutil.Process(broker_pid)
        before = broker.memory_info().rss
        opened: list[aio.Session] = []
        try:
            while len(opened) < sessions:
                k = min(100, sessions - len(opened))
                opened += await asyncio.gather(*(aio.connect(socket_path) for _ in range(k)))
            await opened[0].ping()
            after = broker.memory_info().rss
        finally:
            await asyncio.gather(*(s.close() for s in opened))
        return {
            "sessions": len(opened),
            "rss_idle_mb": before / 2**20,
            "rss_sessions_mb": after / 2**20,
            "per_session_kb": (after - before) / len(opened) / 1024,
        }

    return asyncio.run(main())


# --- cancel storm ----------------------------------------------------------------------------


async def _kills(session: aio.Session) -> int:
    """Workers the broker killed so far for a cancel (its status report counts them)."""
    status = await session.status()
    ends: dict[str, int] = status["totals"]["worker_ends"]  # type: ignore[index]
    return ends.get("cancel", 0)


async def _wait_idle_aio(session: aio.Session, count: int) -> None:
    deadline = time.monotonic() + 30
    while not _all_idle(await session.status(), count):
        if time.monotonic() > deadline:
            raise BenchError("timed out after 30 s waiting for idle workers")
        await asyncio.sleep(0.005)


def storm_pbt(
    socket_path: str, broker_log: str, tabs: int, period_ms: float, switches: int, query_ms: float
) -> Metrics:
    """The cancel storm: ``tabs`` sessions, each moving its page to another record every
    ``period_ms`` (``set_record`` cancels the page's task, killing its worker if it runs) and
    enqueuing that record's ``query_ms`` read. Measured: from each tab's last ``set_record``
    to its last task's result; and the workers the broker killed meanwhile."""

    async def main() -> Metrics:
        sessions = [await aio.connect(socket_path) for _ in range(tabs)]
        try:
            pages = [await s.open_page("Storm", "Customer: 0") for s in sessions]
            for page in pages:
                await (await page.enqueue_background_task(NOOP)).result()
            await _wait_idle_aio(sessions[0], 2)
            kills = await _kills(sessions[0])
            start = time.perf_counter()

            async def tab(page: aio.Page) -> tuple[float, float]:
                task: aio.BackgroundTask | None = None
                changed = 0.0
                for i in range(switches):
                    delay = start + i * period_ms / 1000 - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    changed = time.perf_counter()
                    await page.set_record(f"Customer: {i + 1}")
                    task = await page.enqueue_background_task(BUSY, {"ms": str(query_ms)})
                assert task is not None
                await task.result(timeout=120)
                return changed, time.perf_counter()

            ends = await asyncio.gather(*(tab(page) for page in pages))
            latencies = [done - changed for changed, done in ends]
            storm_s = max(changed for changed, _ in ends) - start
            await _wait_idle_aio(sessions[0], 2)
            kills = await _kills(sessions[0]) - kills
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
        return stats_ms("", latencies) | {"kills": kills, "storm_s": storm_s}

    return asyncio.run(main())


# --- fairness ----------------------------------------------------------------------------------


def fairness_pbt(socket_path: str, depth: int, n: int, warmup: int, busy_ms: float) -> Metrics:
    """One session keeps ``depth`` tasks waiting; another session enqueues single no-ops, each
    at a random moment (untimed pause of up to one busy task), and times their round trip."""
    with connect(socket_path) as busy_session, connect(socket_path) as probe_session:
        busy_page = _open_page(busy_session)
        probe_page = _open_page(probe_session)
        _wait_idle(probe_session, 2)
        busy: list[BackgroundTask] = []
        parameters = {"seconds": str(busy_ms / 1000)}

        pause = random.Random(1)

        def top_up() -> None:
            time.sleep(pause.uniform(0, busy_ms / 1000))  # a click at a random moment
            busy[:] = [task for task in busy if not task.done()]
            while len(busy) < depth:
                busy.append(busy_page.enqueue_background_task(SLEEP, parameters))

        def probe() -> None:
            probe_page.enqueue_background_task(NOOP).result(timeout=60)

        samples = time_calls(probe, n, warmup, top_up)
        busy_page.close()
        _wait_idle(probe_session, 2)
    return stats_ms("", samples)
