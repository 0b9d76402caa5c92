"""Scenarios 2-4, what things cost: the HAProxy hop (round trip, throughput, CPU) against a
direct connection, one broker against two; a role center cue; replica lag.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

from pbt_server.client import connect
from tests.cluster import haproxy
from tests.cluster.cluster import process_groups
from tests.cluster.codeunits import BLOCKED_CUSTOMERS, NOOP, WATCH_SEQUENCE
from tests.cluster.load import Work, round_trips, throughput
from tests.cluster.measure import summary
from tests.cluster.report import Report, ms
from tests.cluster.topology import (
    AUTH_TOKEN,
    BROKER1,
    BROKER2,
    PRIMARY,
    balancer_address,
    broker_address,
    owner_conninfo,
)

BALANCER = balancer_address()


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
