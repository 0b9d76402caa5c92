"""Scenarios 6-7, a broker goes away: killed (SIGKILL) under load, and frozen (SIGSTOP)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

from pbt_server.client import aio
from pbt_server.errors import PbtError
from tests.cluster import brokers, haproxy
from tests.cluster.codeunits import BLOCKED_CUSTOMERS
from tests.cluster.load import KEEPALIVE, Driver, Ledger, Work, broker_of
from tests.cluster.measure import summary
from tests.cluster.report import Report, eventually, ms
from tests.cluster.topology import (
    AUTH_TOKEN,
    BROKER1,
    BROKER2,
    HEALTH_CHECK,
    balancer_address,
)

BALANCER = balancer_address()


# --- 6. a broker dies -----------------------------------------------------------------------


async def broker_failover(report: Report) -> None:
    ledger = Ledger()
    work = Work(BLOCKED_CUSTOMERS, {"Delay": "20"}, timeout_ms=20_000)
    drivers = [
        Driver(f"s{i}", BALANCER, ledger, work, in_flight=2, reconnect=True) for i in range(8)
    ]
    victim, survivor = BROKER1, BROKER2
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    extra: list[aio.Session] = []
    try:
        for driver in drivers:
            await driver.open()
        victim_pid, survivor_pid = brokers.pid(victim), brokers.pid(survivor)
        on_victim = [d for d in drivers if d.current.broker_pid == victim_pid]
        on_survivor = [d for d in drivers if d.current.broker_pid == survivor_pid]
        assert on_victim, "the victim needs sessions"
        assert on_survivor, "the survivor needs sessions"
        runs = [asyncio.create_task(driver.run(stop)) for driver in drivers]
        await eventually(lambda: all(d.current.completed >= 3 for d in drivers), 20, "warm-up")

        killed_at = time.monotonic()
        brokers.kill(victim)
        marked_down = asyncio.create_task(
            asyncio.to_thread(haproxy.wait_status, victim.name, "DOWN", 15)
        )
        await eventually(
            lambda: all(d.connections[0].lost_at for d in on_victim), 10, "ConnectionLost"
        )
        lost_after = [d.connections[0].lost_at - killed_at for d in on_victim]  # type: ignore[operator]
        await eventually(
            lambda: all(len(d.connections) > 1 and d.current.first_completed_at for d in on_victim),
            20,
            "the victim's users complete a task on a new session",
        )
        failover = [d.connections[1].first_completed_at - killed_at for d in on_victim]  # type: ignore[operator]
        down_after = await marked_down
        survivor_before = sum(d.current.completed for d in on_survivor)
        await eventually(
            lambda: sum(d.current.completed for d in on_survivor) > survivor_before + 20,
            20,
            "the survivor's sessions go on",
        )
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
        await eventually(lambda: ledger.awaiting_triggers() == 0, 10, "triggers run")

        report.number("failover.connection_lost_ms", summary(lost_after, 1e3, 1))
        report.number("failover.first_task_on_new_session_ms", summary(failover, 1e3, 1))
        report.number("failover.haproxy_marked_down_ms", ms(down_after))
        lost_texts = ledger.texts("lost")
        report.check(
            "broker killed: ConnectionLost at once",
            max(lost_after) < 2.0,
            f"{len(on_victim)} sessions on the killed broker: their pending handles failed"
            f" with ConnectionLost {ms(min(lost_after))}-{ms(max(lost_after))} ms after SIGKILL"
            f" ({next(iter(lost_texts), '')!r})",
        )
        new_brokers = {d.connections[1].broker_pid for d in on_victim}
        failures = sum((d.connect_failures for d in on_victim), Counter[str]())
        report.check(
            "broker killed: new sessions on the survivor",
            new_brokers == {survivor_pid},
            f"reconnected sessions landed on pid(s) {sorted(new_brokers)} (survivor"
            f" {survivor_pid}); first task on a new session {ms(min(failover))} ms after the"
            f" kill, all {ms(max(failover))} ms; HAProxy marked {victim.name} DOWN after"
            f" {ms(down_after)} ms; failed reconnects {dict(failures) or 0}",
        )
        survivor_outcomes = ledger.outcomes(lambda key: key[0] in {d.label for d in on_survivor})
        report.check(
            "broker killed: survivor untouched",
            all(len(d.connections) == 1 for d in on_survivor)
            and set(survivor_outcomes) == {"completed"},
            f"{len(on_survivor)} sessions on {survivor.name} kept their session; their tasks:"
            f" {dict(survivor_outcomes)}",
        )
        victim_labels = {d.label for d in on_victim}
        first = ledger.outcomes(lambda key: key[0] in victim_labels and key[1] == 0)
        later = ledger.outcomes(lambda key: key[0] in victim_labels and key[1] > 0)
        problems = ledger.problems()
        report.check(
            "broker killed: one outcome per task",
            not problems and set(first) <= {"completed", "lost"} and set(later) == {"completed"},
            f"{len(ledger.tasks)} tasks, each with exactly one outcome; on the killed broker"
            f" {dict(first)}, after reconnecting {dict(later)}; enqueues refused"
            f" {dict(ledger.refused) or 0}" + (f"; PROBLEMS: {problems[:5]}" if problems else ""),
        )

        restarted_at = time.monotonic()
        await asyncio.to_thread(brokers.start, victim)
        up_after = await asyncio.to_thread(haproxy.wait_status, victim.name, "UP", 20)
        report.number("failover.restart_to_up_ms", ms(time.monotonic() - restarted_at))
        fresh = [await aio.connect(BALANCER, token=AUTH_TOKEN) for _ in range(2)]
        extra += fresh
        landed = [await broker_of(session) for session in fresh]
        new_pid = brokers.pid(victim)
        report.check(
            "broker back: takes new sessions",
            landed == [new_pid, new_pid],
            f"restarted {victim.name} was UP in HAProxy {ms(up_after)} ms after it answered;"
            f" with {len(drivers)} sessions still on {survivor.name}, the next 2 went to"
            f" {['b1' if pid == new_pid else 'b2' for pid in landed]} (sessions do not move:"
            " only new ones rebalance)",
        )
    finally:
        stop.set()
        for run in runs:
            run.cancel()
        for session in extra:
            await session.close()
        for driver in drivers:
            await driver.close()
        if brokers.pid(victim) is None:
            await asyncio.to_thread(brokers.start, victim)
            await asyncio.to_thread(haproxy.wait_status, victim.name, "UP", 20)


# --- 7. a broker freezes ----------------------------------------------------------------------


FREEZE_SECONDS = 5.0


async def _new_sessions_meanwhile(count: int) -> int:
    """Open ``count`` sessions through HAProxy (1 s to answer); return how many got none."""
    hung = 0
    for _ in range(count):
        try:
            session = await aio.connect(BALANCER, token=AUTH_TOKEN, timeout=1.0)
        except PbtError:
            hung += 1
        else:
            await session.close()
    return hung


async def frozen_broker(report: Report) -> None:
    ledger = Ledger()
    work = Work(BLOCKED_CUSTOMERS, {"Delay": "20"}, timeout_ms=30_000)
    drivers = [Driver(f"f{i}", BALANCER, ledger, work) for i in range(4)]
    victim = BROKER1
    stop = asyncio.Event()
    runs: list[asyncio.Task[None]] = []
    frozen: int | None = None
    try:
        for driver in drivers:
            await driver.open()
        victim_pid = brokers.pid(victim)
        on_victim = [d for d in drivers if d.current.broker_pid == victim_pid]
        assert on_victim, "the victim needs sessions"
        runs = [asyncio.create_task(driver.run(stop)) for driver in drivers]
        await eventually(lambda: all(d.current.completed >= 3 for d in drivers), 20, "warm-up")
        assert victim_pid is not None
        os.kill(victim_pid, signal.SIGSTOP)
        frozen = victim_pid
        frozen_at = time.monotonic()
        seen_states: set[str] = set()
        newcomers = asyncio.create_task(_new_sessions_meanwhile(2))
        while time.monotonic() - frozen_at < FREEZE_SECONDS:
            state = haproxy.servers().get(victim.name)
            if state is not None:
                seen_states.add(state.status)
            if all(d.current.lost_at for d in on_victim):
                break
            await asyncio.sleep(0.05)
        noticed = [d.current.lost_at - frozen_at for d in on_victim if d.current.lost_at]
        hung = await newcomers
        os.kill(victim_pid, signal.SIGCONT)
        frozen = None
        detail = (
            f"HAProxy's {HEALTH_CHECK} check saw {victim.name} as {sorted(seen_states)} while it"
            f" was frozen, and {hung} of 2 new sessions opened meanwhile got no hello answer"
        )
        if len(noticed) == len(on_victim):
            report.number("frozen.connection_lost_ms", summary(noticed, 1e3, 1))
            report.check(
                "frozen broker noticed",
                True,
                f"pending handles failed with ConnectionLost {ms(max(noticed))} ms after"
                f" SIGSTOP (client keepalive {KEEPALIVE:g} s); {detail}",
            )
        else:
            report.check(
                "frozen broker noticed",
                False,
                f"{len(on_victim) - len(noticed)} sessions still waited after"
                f" {FREEZE_SECONDS:.0f} s (client keepalive {KEEPALIVE:g} s); {detail}",
            )
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), 40)
        await eventually(lambda: ledger.awaiting_triggers() == 0, 10, "triggers run")
        problems = ledger.problems()
        report.check(
            "frozen broker: one outcome per task",
            not problems,
            f"after SIGCONT: {len(ledger.tasks)} tasks, {dict(ledger.outcomes())}"
            + (f"; PROBLEMS: {problems[:5]}" if problems else ""),
        )
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        stop.set()
        for run in runs:
            run.cancel()
        for driver in drivers:
            await driver.close()
