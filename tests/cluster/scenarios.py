"""The scenarios of ``scripts/cluster test``, run inside the client host's namespace.

Each check prints one line, ``PASS``, ``FAIL`` or ``SKIP`` (a feature this checkout does not
have yet; never a pass), and the numbers go into one table at the end (and ``--json``). The
scenarios that break something put it back in a ``finally``, so one failure does not spoil
the next scenario: the destructive ones come last.

1. **basics**: a cue through HAProxy reads the standby; sessions spread over both brokers;
   a wrong token is refused through the balancer too; the standby refuses a write;
   ``connect([addresses])`` and the web bridge if this checkout has them.
2. **hop cost**: no-op round trip and throughput through HAProxy against a direct connection
   to the same broker; throughput with one and with two brokers; CPU per part.
3. **cue cost**: a role center cue (a count on the standby) per second, and its CPU.
4. **replica lag**: rows committed on the primary, watched for by a cue on the standby.
5. **standby outage**: stop the standby under load: database error codes, brokers stay up,
   sessions recover when it returns.
6. **broker failover**: SIGKILL a broker under load: ConnectionLost at once, new sessions on
   the survivor, the survivor's sessions untouched, one outcome per task.
7. **frozen broker**: SIGSTOP a broker: only a client keepalive (or an application-level
   health check in HAProxy) can notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pbt_server.client import aio, connect
from pbt_server.daemon import is_pbt_server
from pbt_server.errors import AuthenticationFailed, BackgroundTaskError, PbtError
from tests.cluster import brokers, haproxy, postgres
from tests.cluster.cluster import process_groups
from tests.cluster.codeunits import BLOCKED_CUSTOMERS, NOOP, TRY_WRITE, WATCH_SEQUENCE, WHOAMI
from tests.cluster.load import Driver, Ledger, Work, broker_of, round_trips, throughput
from tests.cluster.measure import summary
from tests.cluster.topology import (
    AUTH_TOKEN,
    BROKER1,
    BROKER2,
    BROKERS,
    HEALTH_CHECK,
    PRIMARY,
    STANDBY,
    balancer_address,
    broker_address,
    owner_conninfo,
)

BALANCER = balancer_address()
BLOCKED_QUERY = "SELECT count(*) FROM customer WHERE blocked <> ''"


@dataclass
class Report:
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def _line(self, status: str, name: str, detail: str) -> None:
        self.checks.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self._line("PASS" if ok else "FAIL", name, detail)
        return ok

    def skip(self, name: str, why: str) -> None:
        self._line("SKIP", name, why)

    def known_failure(self, name: str, ok: bool, detail: str, why: str) -> None:
        """A check that fails today for a reason in the product (``why``): XFAIL, not a
        failure. Once it passes it is reported as a failure, so that someone turns it into a
        plain check (pytest's strict xfail)."""
        if ok:
            self._line("FAIL", name, f"passes now ({detail}): make it a plain check")
        else:
            self._line("XFAIL", name, f"{detail}; known: {why}")

    def number(self, key: str, value: Any) -> None:
        self.numbers[key] = value

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.checks)

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"--- {name}", flush=True)
        try:
            yield
        except Exception as err:
            self._line("FAIL", name, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        self.numbers.setdefault("scenario_seconds", {})[name] = round(time.monotonic() - started, 1)


async def eventually(predicate: Callable[[], object], within: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail after ``within`` s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def primary_blocked_count() -> int:
    with psycopg.connect(owner_conninfo(PRIMARY), autocommit=True) as db:
        row = db.execute(BLOCKED_QUERY).fetchone()
        assert row is not None
        return int(row[0])


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


# --- 1. basics ------------------------------------------------------------------------------


def basics(report: Report) -> None:
    expected = primary_blocked_count()
    with connect(BALANCER, token=AUTH_TOKEN) as session:
        page = session.open_page("Role Center")
        results = page.enqueue_background_task(BLOCKED_CUSTOMERS).result(timeout=10)
        report.check(
            "cue through HAProxy",
            results["BlockedCustomers"] == str(expected),
            f"a cue through the balancer read {results['BlockedCustomers']} blocked customers"
            f" on the standby; the primary has {expected}",
        )
        try:
            page.enqueue_background_task(TRY_WRITE).result(timeout=10)
            report.check("standby refuses writes", False, "an INSERT on the standby succeeded")
        except BackgroundTaskError as err:
            report.check(
                "standby refuses writes",
                err.code == "DB:WriteDenied",
                f"a child session's INSERT failed with {err.code}: {err.text.strip()}",
            )

    pids = {host.name: brokers.pid(host) for host in BROKERS}
    sessions = [connect(BALANCER, token=AUTH_TOKEN) for _ in range(4)]
    try:
        landed = Counter(_whoami(session.open_page("Spread")) for session in sessions)
    finally:
        for session in sessions:
            session.close()
    by_name = {name: landed.get(pid or 0, 0) for name, pid in pids.items()}
    report.check(
        "leastconn spreads sessions",
        sorted(by_name.values()) == [2, 2],
        f"4 sessions opened one after another through HAProxy landed {by_name}",
    )

    for host in BROKERS:
        with connect(broker_address(host), token=AUTH_TOKEN) as session:
            pid = _whoami(session.open_page("Direct"))
        report.check(
            f"direct to {host.name}",
            pid == pids[host.name],
            f"a session to {host.address} directly ran on broker pid {pid}",
        )

    try:
        connect(BALANCER, token="not-the-token-at-all").close()
        report.check("token through HAProxy", False, "a wrong token was accepted")
    except AuthenticationFailed as err:
        report.check(
            "token through HAProxy", True, f"a wrong token is refused through it: {err.code}"
        )

    _address_list(report)
    _web_bridge(report)


def _whoami(page: Any) -> int:
    return int(page.enqueue_background_task(WHOAMI).result(timeout=10)["broker_pid"])


def _address_list(report: Report) -> None:
    """``connect([a, b])`` (tried in order): the first address here has no broker."""
    nowhere = (BROKER1.address, 7099)
    try:
        session = connect([nowhere, broker_address(BROKER2)], token=AUTH_TOKEN)  # type: ignore[arg-type]
    except TypeError as err:
        report.skip(
            "connect([addresses])",
            f"this checkout's connect() takes no list of addresses ({err}); the check runs"
            " once the client has it",
        )
        return
    with session:
        pid = _whoami(session.open_page("List"))
    report.check(
        "connect([addresses])",
        pid == brokers.pid(BROKER2),
        f"connect([{nowhere[0]}:{nowhere[1]} (nothing there), b2]) ran on broker pid {pid}",
    )


def _web_bridge(report: Report) -> None:
    if importlib.util.find_spec("pbt_server.web") is None:
        report.skip(
            "web bridge through HAProxy",
            "pbt_server.web is not in this checkout; the check runs once it is",
        )
        return
    report.skip(
        "web bridge through HAProxy",
        "pbt_server.web exists, but this scenario is not yet written against its API"
        " (create_app's arguments): wire it in tests/cluster/scenarios.py",
    )


# --- 2. the cost of the hop, one broker against two -----------------------------------------


THROUGHPUT_ROUNDS = 3
THROUGHPUT_SECONDS = 2.0


def hop_cost(report: Report) -> None:
    """Interleaved rounds (drift on a shared machine hits every variant alike); medians."""
    direct = broker_address(BROKER1)
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_number in range(THROUGHPUT_ROUNDS):
        _throughput_run(runs, "two_brokers_haproxy", BALANCER, Work(NOOP))
        # Drained: b2 takes no new session, so every balanced one goes to b1; it stays
        # checked and UP, so it is back at once.
        haproxy.set_state(BROKER2.name, "drain")
        try:
            haproxy.wait_status(BROKER2.name, "DRAIN")
            if round_number == 0:
                _round_trips(report, direct)
            _throughput_run(runs, "one_broker_direct", direct, Work(NOOP))
            _throughput_run(runs, "one_broker_haproxy", BALANCER, Work(NOOP))
        finally:
            haproxy.set_state(BROKER2.name, "ready")
            haproxy.wait_status(BROKER2.name, "UP")
    for name, measured in runs.items():
        report.numbers.setdefault("throughput", {})[name] = _median_run(measured)
    numbers = report.numbers["throughput"]
    report.check(
        "throughput runs",
        all(not run["errors"] for measured in runs.values() for run in measured),
        ", ".join(f"{name} {run['tasks_per_s']}/s" for name, run in numbers.items())
        + f" (medians of {THROUGHPUT_ROUNDS}); no-op round trip p50"
        f" {report.numbers['round_trip_us.task.direct']['p50']:.0f} µs direct,"
        f" {report.numbers['round_trip_us.task.haproxy']['p50']:.0f} µs through HAProxy",
    )


def _round_trips(report: Report, direct: tuple[str, int]) -> None:
    """Sequential no-op tasks and pings on one session, to b1 directly and through HAProxy."""
    trips: dict[str, dict[str, list[float]]] = {"direct": {}, "haproxy": {}}
    for _ in range(2):
        for name, address in (("direct", direct), ("haproxy", BALANCER)):
            measured = round_trips(address, count=150, warmup=20)
            trips[name].setdefault("task", []).extend(measured.task)
            trips[name].setdefault("ping", []).extend(measured.ping)
    for name, kinds in trips.items():
        for kind, values in kinds.items():
            report.number(f"round_trip_us.{kind}.{name}", summary(values, 1e6, 0))
    report.number(
        "round_trip_us.hop_p50",
        report.numbers["round_trip_us.task.haproxy"]["p50"]
        - report.numbers["round_trip_us.task.direct"]["p50"],
    )


def _throughput_run(
    runs: dict[str, list[dict[str, Any]]],
    name: str,
    address: tuple[str, int],
    work: Work,
    *,
    in_flight: int = 8,
    seconds: float = THROUGHPUT_SECONDS,
) -> dict[str, Any]:
    result = throughput(
        address,
        processes=2,
        sessions=4,
        in_flight=in_flight,
        seconds=seconds,
        work=work,
        groups=process_groups,
    )
    cpu = result.cpu_seconds
    wall = cpu["wall"]
    run = {
        "tasks_per_s": round(result.per_second),
        "tasks": result.tasks,
        "errors": result.errors,
        "cpu_ms_per_task": {
            part: round(used * 1000 / max(result.tasks, 1), 4)
            for part, used in cpu.items()
            if part not in ("wall", "other")
        },
        "cores": {part: round(used / wall, 2) for part, used in cpu.items() if part != "wall"},
    }
    runs.setdefault(name, []).append(run)
    print(f"    {name}: {run['tasks_per_s']} tasks/s, cores {run['cores']}", flush=True)
    return run


def _median_run(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with the range over all runs."""
    ordered = sorted(measured, key=lambda run: run["tasks_per_s"])
    median = dict(ordered[len(ordered) // 2])
    median["tasks_per_s_range"] = [ordered[0]["tasks_per_s"], ordered[-1]["tasks_per_s"]]
    median["runs"] = len(ordered)
    per_task = median["cpu_ms_per_task"]
    # What bounds it: every part shares this machine's cores; a broker is one event loop.
    median["ceiling_if_machine_were_ours"] = round(
        (os.cpu_count() or 1) * 1000 / sum(per_task.values())
    )
    median["one_broker_ceiling"] = round(1000 / per_task["brokers"])
    return median


# --- 3. what a cue costs -------------------------------------------------------------------


def cue_cost(report: Report) -> None:
    noop = round_trips(BALANCER, count=100, warmup=10)
    cues = round_trips(BALANCER, count=100, warmup=10, work=Work(BLOCKED_CUSTOMERS))
    query = [float(r["QuerySeconds"]) for r in cues.results]
    report.number("cue.round_trip_ms", summary(cues.task, 1e3, 2))
    report.number("cue.noop_round_trip_ms", summary(noop.task, 1e3, 2))
    report.number("cue.query_ms", summary(query, 1e3, 2))
    runs: dict[str, list[dict[str, Any]]] = {}
    run = _throughput_run(runs, "cues_two_brokers", BALANCER, Work(BLOCKED_CUSTOMERS), in_flight=2)
    report.numbers.setdefault("throughput", {})["cues_two_brokers"] = run
    report.check(
        "cue throughput",
        not run["errors"],
        f"{run['tasks_per_s']} cues/s over two brokers (4 workers); a cue's query takes"
        f" {report.numbers['cue.query_ms']['p50']} ms p50 on the standby",
    )


# --- 4. replica lag ----------------------------------------------------------------------


def replica_lag(report: Report) -> None:
    with (
        psycopg.connect(owner_conninfo(PRIMARY), autocommit=True) as db,
        connect(BALANCER, token=AUTH_TOKEN) as session,
    ):
        page = session.open_page("Lag")
        row = db.execute("SELECT coalesce(max(seq), 0) FROM lag_probe").fetchone()
        base = int(row[0]) if row else 0
        for condition in ("idle", "write_load"):
            stop = threading.Event()
            writer = threading.Thread(target=_write_load, args=(stop,), daemon=True)
            if condition == "write_load":
                writer.start()
            try:
                lags, count, seen = _lag_samples(db, page, base, rows=150)
            finally:
                stop.set()
                if writer.is_alive():
                    writer.join()
            base += count
            report.number(f"replica_lag_ms.{condition}", summary(lags, 1e3, 2))
            report.check(
                f"replica lag ({condition.replace('_', ' ')})",
                seen == count,
                f"{seen} of {count} rows committed on the primary were seen by a cue on the"
                f" standby; lag p50 {ms(_p(lags, 0.5))} ms, p99 {ms(_p(lags, 0.99))} ms",
            )


def _p(values: list[float], fraction: float) -> float:
    return summary(values, 1.0, 6)["p99" if fraction > 0.5 else "p50"]


def _lag_samples(
    db: psycopg.Connection[Any], page: Any, base: int, rows: int
) -> tuple[list[float], int, int]:
    """Commit ``rows`` rows 10 ms apart while one cue watches; lag per row it saw."""
    task = page.enqueue_background_task(
        WATCH_SEQUENCE,
        {"After": str(base), "Last": str(base + rows), "Seconds": "20"},
        timeout=30_000,
    )
    committed: dict[int, tuple[float, float]] = {}
    time.sleep(0.05)  # pacing: give the watcher time to start (samples before it are dropped)
    for seq in range(base + 1, base + rows + 1):
        before = time.monotonic()
        db.execute("INSERT INTO lag_probe (seq) VALUES (%s)", (seq,))
        committed[seq] = (before, time.monotonic())
        time.sleep(0.01)
    results = task.result(timeout=30)
    first_poll = float(results["FirstPoll"])
    seen = dict(
        (int(seq), float(at)) for seq, at in (pair.split("=") for pair in results["Seen"].split())
    )
    lags = [
        seen[seq] - done
        for seq, (before, done) in committed.items()
        if seq in seen and before > first_poll
    ]
    return lags, rows, len(seen)


def _write_load(stop: threading.Event) -> None:
    """The application writing on the primary meanwhile: 200-row updates, back to back."""
    with psycopg.connect(owner_conninfo(PRIMARY), autocommit=True) as db:
        start = 1
        while not stop.is_set():
            db.execute(
                "UPDATE customer SET name = name WHERE id BETWEEN %s AND %s",
                (start, start + 199),
            )
            start = start % 4800 + 200


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
    cancelled, which kills its worker): the replacement cannot connect at boot."""
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
            if victim_pid is None or not is_pbt_server(victim_pid):
                break
            await asyncio.sleep(0.2)
        alive = victim_pid is not None and is_pbt_server(victim_pid)
        lasted = time.monotonic() - stopped_at
        log = brokers.log_tail(victim)
        reason = next((line for line in reversed(log.splitlines()) if "failed to boot" in line), "")
        report.known_failure(
            "long standby outage: brokers stay up",
            alive,
            f"{victim.name} {'still runs' if alive else 'stopped itself'} {lasted:.1f} s into"
            f" a standby outage after one worker was replaced"
            + (f" ({reason.split(': ', 1)[-1][:140]})" if reason else ""),
            "a worker cannot boot without its database connection, and a broker whose"
            " workers fail to boot 8 times in a row (~20 s) stops: a standby outage longer"
            " than that, plus any worker replacement (timeout, cancel, crash, recycle), takes"
            " the broker down (product: pool boot policy)",
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
        landed = [await broker_of(await session.open_page("New")) for session in fresh]
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


def _client_has_keepalive() -> bool:
    names = set(inspect.signature(aio.connect).parameters)
    return any(word in name for name in names for word in ("keepalive", "heartbeat"))


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
                f" SIGSTOP; {detail}",
            )
        elif _client_has_keepalive() or HEALTH_CHECK == "http":
            report.check(
                "frozen broker noticed",
                False,
                f"{len(on_victim) - len(noticed)} sessions still waited after"
                f" {FREEZE_SECONDS:.0f} s; {detail}",
            )
        else:
            report.skip(
                "frozen broker noticed",
                f"nothing noticed in {FREEZE_SECONDS:.0f} s: the clients have no keepalive yet"
                f" and {detail} (a TCP check connects to a stopped process: the kernel"
                " accepts); needs the client keepalive or the HTTP health check",
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


# --- the run --------------------------------------------------------------------------------


def _check_alive(report: Report) -> None:
    for host in BROKERS:
        pid = brokers.pid(host)
        if pid is None or not is_pbt_server(pid):
            raise AssertionError(f"broker {host.name} is not running")


SCENARIOS: list[tuple[str, Callable[[Report], object]]] = [
    ("basics", basics),
    ("hop cost", hop_cost),
    ("cue cost", cue_cost),
    ("replica lag", replica_lag),
    ("standby outage", lambda report: asyncio.run(standby_outage(report))),
    ("long standby outage", lambda report: asyncio.run(long_standby_outage(report))),
    ("broker failover", lambda report: asyncio.run(broker_failover(report))),
    ("frozen broker", lambda report: asyncio.run(frozen_broker(report))),
]


def main(json_path: str | None = None, only: set[str] | None = None) -> int:
    report = Report()
    started = time.monotonic()
    report.number("machine", {"cpus": os.cpu_count(), "load_average": os.getloadavg()})
    for name, scenario in SCENARIOS:
        if only and name not in only:
            continue
        with report.scenario(name):
            _check_alive(report)
            scenario(report)
    report.number("total_seconds", round(time.monotonic() - started, 1))
    report.numbers["machine"]["load_average_end"] = os.getloadavg()
    print("--- numbers")
    print(json.dumps(report.numbers, indent=1, sort_keys=True))
    passed = sum(1 for status, _, _ in report.checks if status == "PASS")
    skipped = [name for status, name, _ in report.checks if status == "SKIP"]
    known = [name for status, name, _ in report.checks if status == "XFAIL"]
    failed = [name for status, name, _ in report.checks if status == "FAIL"]
    print(
        f"--- {passed} passed, {len(failed)} failed, {len(skipped)} skipped,"
        f" {len(known)} known failures"
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
        + (f" (known failures: {', '.join(known)})" if known else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    if json_path:
        with open(json_path, "w") as file:
            json.dump({"checks": report.checks, "numbers": report.numbers}, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
