"""Scenario 5, the standby goes away: under load (tasks fail with database errors, brokers and
sessions stay, all recover when it returns), and for longer than the pool's boot retries.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import psycopg

from pbt_server.client import aio, connect
from pbt_server.errors import PbtError
from tests.broker_process import alive
from tests.cluster import brokers, haproxy, postgres
from tests.cluster.codeunits import BLOCKED_CUSTOMERS
from tests.cluster.load import Driver, Ledger, Work
from tests.cluster.measure import summary
from tests.cluster.report import Report, eventually, ms
from tests.cluster.topology import (
    AUTH_TOKEN,
    BROKER1,
    BROKERS,
    STANDBY,
    balancer_address,
    broker_address,
)

BALANCER = balancer_address()


def database_error_codes() -> set[str]:
    """What a lost database connection may surface as today: psycopg's class names."""
    names, stack = set(), [psycopg.OperationalError, psycopg.InterfaceError]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack += cls.__subclasses__()
    return names


def is_database_error(code: str) -> bool:
    """A ``DB:…`` code (what the lead is adding), or a psycopg connection error's name."""
    return code.startswith("DB:") or code in database_error_codes()


# --- 5. the standby goes away and comes back ---------------------------------------------------


STANDBY_OUTAGE_SECONDS = 3.0


async def standby_outage(report: Report) -> None:
    ledger = Ledger()
    work = Work(BLOCKED_CUSTOMERS, timeout_ms=10_000)
    drivers = [Driver(f"db{i}", BALANCER, ledger, work, pause_after_error=0.05) for i in range(6)]
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    restarted = False
    try:
        for driver in drivers:
            await driver.open()
        runs = [asyncio.create_task(driver.run(stop)) for driver in drivers]
        await eventually(lambda: all(d.current.completed >= 2 for d in drivers), 20, "warm-up")
        stopped_at = time.monotonic()
        await asyncio.to_thread(postgres.stop, STANDBY, "fast")
        report.number("standby_outage.stop_seconds", round(time.monotonic() - stopped_at, 2))

        def errors_since() -> list[tuple[str, str]]:
            return [
                (code, record.text)
                for record in ledger.tasks.values()
                for kind, code, at in record.outcomes
                if kind == "error" and at > stopped_at
            ]

        def sessions_failing() -> bool:
            failing = Counter(
                key[0]
                for key, record in ledger.tasks.items()
                for kind, _, at in record.outcomes
                if kind == "error" and at > stopped_at
            )
            return len(failing) == len(drivers) and min(failing.values()) >= 3

        # Down for a while (STANDBY_OUTAGE_SECONDS), long enough that every session failed
        # again and again, short enough that no worker had to be replaced meanwhile.
        await eventually(
            lambda: sessions_failing() and time.monotonic() - stopped_at >= STANDBY_OUTAGE_SECONDS,
            20,
            "every session's tasks fail while it is down",
        )
        report.number("standby_outage.down_seconds", round(time.monotonic() - stopped_at, 2))
        errors = errors_since()
        codes = Counter(code for code, _ in errors)
        report.number("standby_outage.error_codes", dict(codes))
        sample = {code: text.strip().splitlines()[0][:160] for code, text in errors}
        report.number("standby_outage.error_texts", sample)
        report.check(
            "standby down: database errors",
            all(is_database_error(code) for code in codes),
            f"tasks failed with {dict(codes)} (e.g. {next(iter(sample.values()))!r}); the"
            " lead's DB:* codes are accepted too",
        )
        alive = await asyncio.to_thread(_brokers_answer)
        states = {name: s.status for name, s in haproxy.servers().items()}
        lost = ledger.outcomes().get("lost", 0)
        report.check(
            "standby down: brokers stay up",
            all(alive.values()) and set(states.values()) == {"UP"} and lost == 0,
            f"brokers answer {alive}, HAProxy says {states}, {lost} sessions lost",
        )
        started_at = time.monotonic()
        await asyncio.to_thread(postgres.start, STANDBY)
        restarted = True
        up_at = time.monotonic()
        report.number("standby_outage.start_seconds", round(up_at - started_at, 2))

        def first_success(label: str) -> float | None:
            times = [
                at
                for key, record in ledger.tasks.items()
                if key[0] == label
                for kind, _, at in record.outcomes
                if kind == "completed" and at > up_at
            ]
            return min(times) if times else None

        await eventually(
            lambda: all(first_success(d.label) for d in drivers), 20, "every session recovers"
        )
        recovery = [first_success(d.label) - up_at for d in drivers]  # type: ignore[operator]
        report.number("standby_outage.recovery_ms", summary(recovery, 1e3, 1))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
        await eventually(lambda: ledger.awaiting_triggers() == 0, 10, "triggers run")
        problems = ledger.problems()
        report.check(
            "standby back: sessions recover",
            not problems,
            f"every session's next cue succeeded {ms(min(recovery))}-{ms(max(recovery))} ms"
            f" after the standby accepted connections again; {len(ledger.tasks)} tasks, each"
            f" with one outcome ({dict(ledger.outcomes())})"
            + (f"; PROBLEMS: {problems[:5]}" if problems else ""),
        )
    finally:
        stop.set()
        for run in runs:
            run.cancel()
        for driver in drivers:
            await driver.close()
        if not restarted:
            await asyncio.to_thread(postgres.start, STANDBY)
        await asyncio.to_thread(postgres.wait_streaming)


def _brokers_answer() -> dict[str, bool]:
    answers = {}
    for host in BROKERS:
        try:
            with connect(broker_address(host), token=AUTH_TOKEN, timeout=5) as session:
                session.ping()
            answers[host.name] = True
        except PbtError:
            answers[host.name] = False
    return answers


LONG_OUTAGE_SECONDS = 26.0
"""Longer than the ~20 s of boot retries after which a broker gives up on its workers."""


async def long_standby_outage(report: Report) -> None:
    """The standby stays away, and meanwhile one worker is replaced (a running task is
    cancelled, which kills its worker): the replacement cannot connect at boot, and must
    boot all the same."""
    victim = BROKER1
    victim_pid = brokers.pid(victim)
    session = await aio.connect(broker_address(victim), token=AUTH_TOKEN)
    restarted_standby = False
    try:
        page = await session.open_page("Long outage")
        task = await page.enqueue_background_task(
            BLOCKED_CUSTOMERS, {"Delay": "60000"}, timeout=120_000
        )
        await _until_running(session)
        await asyncio.to_thread(postgres.stop, STANDBY, "fast")
        stopped_at = time.monotonic()
        await task.cancel()  # kills the running worker: the pool boots a replacement
        while time.monotonic() - stopped_at < LONG_OUTAGE_SECONDS:
            if victim_pid is None or not alive(victim_pid):
                break
            await asyncio.sleep(0.2)
        survived = victim_pid is not None and alive(victim_pid)
        lasted = time.monotonic() - stopped_at
        log = brokers.log_tail(victim)
        reason = next((line for line in reversed(log.splitlines()) if "failed to boot" in line), "")
        report.check(
            "long standby outage: brokers stay up",
            survived,
            f"{victim.name} {'still runs' if survived else 'stopped itself'} {lasted:.1f} s into"
            f" a standby outage after one worker was replaced (a replacement boots without its"
            f" database and connects on its first statement)"
            + (f" ({reason.split(': ', 1)[-1][:140]})" if reason else ""),
        )
        await asyncio.to_thread(postgres.start, STANDBY)
        restarted_standby = True
    finally:
        await session.close()
        if not restarted_standby:
            await asyncio.to_thread(postgres.start, STANDBY)
        await asyncio.to_thread(postgres.wait_streaming)
        if brokers.pid(victim) is None:
            await asyncio.to_thread(brokers.start, victim)
        await asyncio.to_thread(haproxy.wait_status, victim.name, "UP", 20)


async def _until_running(session: aio.Session) -> None:
    async def running() -> bool:
        sessions = (await session.status())["sessions"]
        assert isinstance(sessions, list)
        return any(s["id"] == session.id and s["running"] for s in sessions)

    started = time.monotonic()
    while not await running():
        if time.monotonic() - started > 10:
            raise AssertionError("the task did not start within 10 s")
        await asyncio.sleep(0.01)
