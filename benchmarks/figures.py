"""The figures, one record each, in the order the runner measures and the report shows them.

Adding a figure is one record here (and its measuring functions): see benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from benchmarks import floors, metrics_cost, pbt, pools, sharing
from benchmarks.codeunits import CACHED_NOOP, CUES, NOOP, SHARED_CUES, SHARED_NOOP, SPIN, STOPPED
from benchmarks.figure import Figure, Limit, Measurement, Ratio, Rule, Summary, Table, num
from benchmarks.load import WINDOW
from benchmarks.pools import PEBBLE_TIMEOUT, POOL_WORKERS

PPE: Final = f"ProcessPoolExecutor({POOL_WORKERS}, fork)"
PEBBLE: Final = f"pebble.ProcessPool({POOL_WORKERS}), timeout={PEBBLE_TIMEOUT:.0f} s"
MP_POOL: Final = f"multiprocessing.Pool({POOL_WORKERS}, fork)"
PIPE_FLOOR: Final = "floor: msgpack over os.pipe (2 processes)"
SOCKET_FLOOR: Final = "floor: msgpack echo, asyncio Unix socket"
POOL_LABELS: Final = {"ppe": PPE, "pebble": PEBBLE, "mp-pool": MP_POOL}


def _cell(spread: Any) -> str:
    if not spread:
        return "-"
    return f"{num(spread['median'])} ({num(spread['low'])}-{num(spread['high'])})"


# --- latency -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyParams:
    n: int = 2000
    warmup: int = 200


def _latency_plan(p: LatencyParams) -> list[Measurement]:
    lat = {"n": p.n, "warmup": p.warmup}
    return [
        Measurement("pbt-sync", "pbt-server, sync client", pbt.latency_pbt_sync, lat, broker=True),
        Measurement("pbt-aio", "pbt-server, asyncio client", pbt.latency_pbt_aio, lat, broker=True),
        *(
            Measurement(kind, label, pools.latency_pool, {"kind": kind, **lat})
            for kind, label in POOL_LABELS.items()
        ),
        Measurement("pipe-floor", PIPE_FLOOR, floors.latency_pipe, lat),
        Measurement("socket-floor", SOCKET_FLOOR, floors.latency_socket, lat),
    ]


LATENCY = Figure(
    name="latency",
    about="sequential submit -> result, one session / one caller, p50 and p99",
    params=LatencyParams(),
    quick=LatencyParams(n=200, warmup=20),
    plan=_latency_plan,
    tables=lambda p: [
        Table(
            "Sequential no-op round trip, one session / one caller (µs)",
            [("p50_us", "p50"), ("p99_us", "p99")],
        )
    ],
    targets=lambda p: [
        Ratio(
            f"no-op round trip p50 ({client} client) ≤ {limit:g}x ProcessPoolExecutor's",
            system,
            "ppe",
            "p50_us",
            limit,
            unit="µs",
        )
        for system, client, limit in (("pbt-sync", "sync", 0.5), ("pbt-aio", "asyncio", 0.6))
    ],
)


# --- throughput --------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputParams:
    tasks: int = 10_000  # per measurement, split over the sessions
    warmup: int = 200  # the pools' untimed tasks first
    sessions: tuple[int, ...] = (1, 5, 50)


def _sessions(n: int) -> str:
    return f"{n} session" if n == 1 else f"{n} sessions"


def _throughput_plan(p: ThroughputParams) -> list[Measurement]:
    found = []
    for n in p.sessions:
        load = {"sessions": n, "total": p.tasks}
        in_flight = f", {_sessions(n)} x {WINDOW} in flight"
        found += [
            Measurement(
                f"pbt@{n}", "pbt-server" + in_flight, pbt.throughput_pbt, load, broker=True
            ),
            Measurement(
                f"socket-floor@{n}", SOCKET_FLOOR + in_flight, floors.throughput_socket, load
            ),
        ]
    pool = {"total": p.tasks, "warmup": p.warmup}
    found += [
        Measurement(kind, label, pools.throughput_pool, {"kind": kind, **pool})
        for kind, label in POOL_LABELS.items()
    ]
    found.append(Measurement("pipe-floor", PIPE_FLOOR, floors.throughput_pipe, pool))
    return found


def _throughput_targets(p: ThroughputParams) -> list[Rule]:
    return [
        Ratio(
            f"throughput, {_sessions(n)} ≥ {limit:g}x {name}",
            f"pbt@{n}",
            pool,
            "tasks_per_s",
            limit,
            upper=False,
            unit="tasks/s",
        )
        for n in p.sessions
        for pool, name, limit in (
            ("ppe", "ProcessPoolExecutor's", 2.0),
            ("pebble", "pebble's", 1.2),
        )
    ]


THROUGHPUT = Figure(
    name="throughput",
    about=f"no-op tasks/s: 1, 5, 50 client processes x {WINDOW} in flight vs the pools' "
    "submit-all-then-await",
    params=ThroughputParams(),
    quick=ThroughputParams(tasks=600, warmup=20),
    plan=_throughput_plan,
    tables=lambda p: [
        Table("Throughput, no-op tasks (tasks/s)", [("tasks_per_s", "tasks/s")]),
    ],
    targets=_throughput_targets,
)


# --- timeout precision --------------------------------------------------------------------


@dataclass(frozen=True)
class TimeoutParams:
    n: int = 20
    timeout_ms: int = 200


def _timeout_plan(p: TimeoutParams) -> list[Measurement]:
    timeout = {"n": p.n, "timeout_ms": p.timeout_ms}
    return [
        Measurement(
            "pbt",
            "pbt-server, Python code spinning (its stack taken, then the kill)",
            pbt.timeout_pbt,
            {**timeout, "codeunit": SPIN, "stack": " in spin"},
            broker=True,
        ),
        Measurement(
            "pbt-stopped",
            "pbt-server, worker stopped (no stack comes: the kill waits out the broker's limit)",
            pbt.timeout_pbt,
            {**timeout, "codeunit": STOPPED, "stack": "(no stack"},
            broker=True,
        ),
        Measurement(
            "pebble-timeout",
            f"pebble.ProcessPool({POOL_WORKERS}), its own timeout",
            pools.timeout_pebble,
            timeout,
        ),
    ]


TIMEOUT = Figure(
    name="timeout",
    about="a stuck task's timeout error, its stack taken first: arrival - enqueue reply - "
    "the timeout",
    params=TimeoutParams(),
    quick=TimeoutParams(n=3),
    plan=_timeout_plan,
    tables=lambda p: [
        Table(
            f"Timeout precision: error arrival - deadline, timeout {p.timeout_ms} ms (ms)",
            [
                ("p50_ms", "p50"),
                ("p99_ms", "p99"),
                ("max_ms", "max"),
                ("stack_bytes", "call stack (bytes)"),
            ],
        )
    ],
    targets=lambda p: [
        Limit(
            f"timeout error p99 ≤ deadline + 20 ms{what}",
            system,
            "p99_ms",
            20.0,
            "ms",
            detail=f"{p.n} timeouts per run; error ≈ arrival - enqueue reply - {p.timeout_ms} ms",
        )
        for system, what in (
            ("pbt", ", the stuck code's stack in the error"),
            ("pbt-stopped", ", a worker that cannot give its stack"),
        )
    ],
)


# --- cancel -> slot free ------------------------------------------------------------------


@dataclass(frozen=True)
class CancelParams:
    n: int = 30
    rtt_n: int = 200  # no-op round trips measured for the subtraction


CANCEL = Figure(
    name="cancel",
    about="MaxConcurrency 1: cancel() of a running task -> the session's waiting task "
    "completes, minus a no-op round trip",
    params=CancelParams(),
    quick=CancelParams(n=3, rtt_n=30),
    broker={"AsynchronousProcessing": {"ChildSessionsMaxConcurrency": "1"}},
    plan=lambda p: [
        Measurement("pbt", "pbt-server", pbt.cancel_pbt, {"n": p.n, "rtt_n": p.rtt_n}, broker=True)
    ],
    tables=lambda p: [
        Table(
            "Cancel → slot free (ms)",
            [
                ("p50_ms", "p50 - no-op RTT"),
                ("p99_ms", "p99 - no-op RTT"),
                ("raw_p50_ms", "p50 raw"),
                ("cancel_call_p50_ms", "cancel() call p50"),
                ("noop_rtt_ms", "no-op RTT p50"),
            ],
        )
    ],
    targets=lambda p: [
        Limit(
            "cancel → slot free p50 ≤ 5 ms",
            "pbt",
            "p50_ms",
            5.0,
            "ms",
            detail=f"{p.n} cancels per run; minus the median no-op round trip",
        )
    ],
)


# --- kill + replace -----------------------------------------------------------------------


@dataclass(frozen=True)
class KillParams:
    n: int = 30


KILL = Figure(
    name="kill",
    about="Count 1: SIGKILL a busy worker -> crash error -> a no-op completes",
    params=KillParams(),
    quick=KillParams(n=3),
    broker={"Workers": {"Count": "1"}},
    plan=lambda p: [Measurement("pbt", "pbt-server", pbt.kill_pbt, {"n": p.n}, broker=True)],
    tables=lambda p: [
        Table(
            "Kill + replace, Count = 1 (ms)",
            [
                ("error_p50_ms", "kill → error p50"),
                ("error_p99_ms", "p99"),
                ("noop_p50_ms", "error → no-op done p50"),
                ("noop_p99_ms", "p99"),
                ("p50_ms", "total p50"),
                ("p99_ms", "total p99"),
            ],
        )
    ],
    targets=lambda p: [
        Limit(
            "kill + replace p99 ≤ 5 ms",
            "pbt",
            "p99_ms",
            5.0,
            "ms",
            detail=f"{p.n} kills per run; SIGKILL → crash error → a no-op completes",
        )
    ],
)


# --- cancel storm -------------------------------------------------------------------------


@dataclass(frozen=True)
class StormParams:
    tabs: int = 20  # sessions (browser tabs), one page each
    period_ms: float = 10.0  # each tab moves to another record this often
    switches: int = 200  # record changes per tab (200 x 10 ms = 2 s)
    query_ms: float = 20.0  # the read each record change enqueues (CPU, like a query)


def _storm_plan(p: StormParams) -> list[Measurement]:
    storm = {
        "tabs": p.tabs,
        "period_ms": p.period_ms,
        "switches": p.switches,
        "query_ms": p.query_ms,
    }
    return [
        Measurement(
            "pbt",
            "pbt-server (set_record cancels; a running task's worker is killed)",
            pbt.storm_pbt,
            storm,
            broker=True,
            fresh_broker=True,
            broker_log=True,
        ),
        Measurement(
            "ppe-drop",
            f"{PPE}: stale queries cancelled if queued, else finish and are dropped",
            pools.storm_ppe,
            storm,
        ),
    ]


STORM = Figure(
    name="storm",
    about="20 sessions, each set_record every 10 ms + a 20 ms read per record, 2 s: last "
    "set_record -> its result",
    params=StormParams(),
    quick=StormParams(switches=20),
    plan=_storm_plan,
    tables=lambda p: [
        Table(
            f"Cancel storm: {p.tabs} sessions, a record change every {p.period_ms:g} ms with a "
            f"{p.query_ms:g} ms read each, {p.switches * p.period_ms / 1000:g} s; "
            "last record change → its result (ms)",
            [
                ("p50_ms", "p50"),
                ("p99_ms", "p99"),
                ("max_ms", "max"),
                ("kills", "worker kills"),
                ("queries_run", "queries run"),
                ("storm_s", "storm took (s)"),
            ],
        )
    ],
    targets=lambda p: [
        Ratio(
            "cancel storm: last set_record → result p50 ≤ 1.0x a PPE that drops stale results",
            "pbt",
            "ppe-drop",
            "p50_ms",
            1.0,
            unit="ms",
        )
    ],
)


# --- fairness -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FairnessParams:
    depth: int = 20  # tasks the busy session keeps waiting
    n: int = 50  # the other session's single tasks, one after the other
    warmup: int = 3
    busy_ms: float = 20.0  # each busy task sleeps this long


FAIRNESS = Figure(
    name="fairness",
    about="one task behind a busy session: one session keeps the pool saturated with a deep "
    "queue, another enqueues single no-ops; their round trip",
    params=FairnessParams(),
    quick=FairnessParams(depth=10, n=5, warmup=1),
    plan=lambda p: [
        Measurement(
            "pbt",
            "pbt-server (two sessions)",
            pbt.fairness_pbt,
            {"depth": p.depth, "n": p.n, "warmup": p.warmup, "busy_ms": p.busy_ms},
            broker=True,
        ),
        Measurement(
            "ppe",
            f"{PPE} (two submitters)",
            pools.fairness_ppe,
            {"depth": p.depth, "n": p.n, "warmup": p.warmup, "busy_ms": p.busy_ms},
        ),
    ],
    tables=lambda p: [
        Table(
            f"Fairness: a single no-op behind a session that keeps {p.depth} tasks of "
            f"{p.busy_ms:g} ms waiting; its round trip (ms)",
            [("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")],
        )
    ],
)


# --- scale ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleParams:
    depths: tuple[int, ...] = (10, 1_000, 100_000)
    batch: int = 1_000  # enqueues in flight at once, per depth
    sequential: int = 200  # enqueues one after the other, per depth


def _scale_table(p: ScaleParams) -> Table:
    def render(summary: Summary) -> list[str]:
        scale = summary.get("pbt")
        if not scale:
            return []
        lines = [
            f"| waiting | {p.batch:,} enqueues in flight: cost each "
            "| sequential enqueue round trip p50 |",
            "|---|---|---|",
        ]
        for depth in p.depths:
            lines.append(
                f"| {depth:,} | {_cell(scale.get(f'batch_us@{depth}'))} "
                f"| {_cell(scale.get(f'seq_p50_us@{depth}'))} |"
            )
        waiting = scale.get("waiting_at_close")
        lines += [
            "",
            f"Closing that session (≈ {num(waiting['median']) if waiting else '-'} tasks "
            f"waiting) until a new session's ping is answered: {_cell(scale.get('close_ms'))} ms.",
        ]
        return lines

    return Table("Scale: enqueue cost with tasks already waiting (µs per enqueue)", render=render)


SCALE = Figure(
    name="scale",
    about="enqueue cost with 10, 10^3, 10^5 tasks waiting behind a busy worker",
    params=ScaleParams(),
    quick=ScaleParams(depths=(10, 1_000, 5_000), batch=200, sequential=20),
    broker={
        "Workers": {"Count": "1"},
        "AsynchronousProcessing": {
            "ChildSessionsMaxConcurrency": "1",
            "ChildSessionsMaxQueueLength": "200000",
        },
    },
    plan=lambda p: [
        Measurement(
            "pbt",
            "pbt-server",
            pbt.scale_pbt,
            {"depths": p.depths, "batch": p.batch, "sequential": p.sequential},
            broker=True,
            fresh_broker=True,
            limit=900,
        )
    ],
    tables=lambda p: [_scale_table(p)],
    targets=lambda p: [
        Ratio(
            f"enqueue cost at {p.depths[-1]:,} waiting ≤ 1.5x at {p.depths[0]:,}",
            "pbt",
            "pbt",
            f"batch_us@{p.depths[-1]}",
            1.5,
            unit="µs",
            theirs_key=f"batch_us@{p.depths[0]}",
            detail=f"{p.batch:,} enqueues in flight at each depth",
        )
    ],
)


# --- rss ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RssParams:
    sessions: int = 1_000


def _rss_table(p: RssParams) -> Table:
    def render(summary: Summary) -> list[str]:
        rss = summary.get("pbt")
        if not rss:
            return []
        return [
            f"| idle, no session | {p.sessions:,} idle sessions | per session |",
            "|---|---|---|",
            f"| {_cell(rss.get('rss_idle_mb'))} MB | {_cell(rss.get('rss_sessions_mb'))} MB "
            f"| {_cell(rss.get('per_session_kb'))} KB |",
        ]

    return Table("Broker memory (RSS of the broker process, workers not included)", render=render)


RSS = Figure(
    name="rss",
    about="broker RSS with 1,000 idle sessions",
    params=RssParams(),
    quick=RssParams(sessions=100),
    plan=lambda p: [
        Measurement(
            "pbt",
            "pbt-server",
            pbt.rss_pbt,
            {"sessions": p.sessions},
            broker=True,
            fresh_broker=True,
            broker_pid=True,
        )
    ],
    tables=lambda p: [_rss_table(p)],
)


# --- the cost of metrics ----------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsParams:
    n: int = 2000  # sequential no-op round trips
    warmup: int = 200
    sessions: int = 5  # throughput: client processes x WINDOW in flight
    tasks: int = 10_000
    scrape_every: float = 1.0  # the scraped system: /metrics and /api/status each second


METRICS_ON: Final = {"Server": {"MetricsAddress": "127.0.0.1:0"}}


def _metrics_plan(p: MetricsParams) -> list[Measurement]:
    load = {"n": p.n, "warmup": p.warmup, "sessions": p.sessions, "total": p.tasks}
    return [
        Measurement(
            "off",
            "MetricsAddress empty",
            metrics_cost.metrics_cost,
            {**load, "scrape_every": 0.0},
            broker=True,
        ),
        Measurement(
            "on",
            "MetricsAddress set, not scraped",
            metrics_cost.metrics_cost,
            {**load, "scrape_every": 0.0},
            broker=True,
            settings=METRICS_ON,
        ),
        Measurement(
            "scraped",
            f"MetricsAddress set, /metrics and /api/status every {p.scrape_every:g} s",
            metrics_cost.metrics_cost,
            {**load, "scrape_every": p.scrape_every},
            broker=True,
            settings=METRICS_ON,
        ),
    ]


METRICS = Figure(
    name="metrics",
    about="the cost of [Server] MetricsAddress: no-op round trip and throughput, on vs off",
    params=MetricsParams(),
    quick=MetricsParams(n=200, warmup=20, tasks=600),
    plan=_metrics_plan,
    tables=lambda p: [
        Table(
            f"The cost of metrics: sync no-op round trip (µs), and no-op tasks/s with "
            f"{p.sessions} client processes x {WINDOW} in flight",
            [("p50_us", "round trip p50"), ("p99_us", "p99"), ("tasks_per_s", "tasks/s")],
        )
    ],
    targets=lambda p: [
        Ratio(
            "metrics on: no-op round trip p50 ≤ 1.03x off", "on", "off", "p50_us", 1.03, unit="µs"
        ),
        Ratio(
            "metrics on: throughput ≥ 0.97x off",
            "on",
            "off",
            "tasks_per_s",
            0.97,
            upper=False,
            unit="tasks/s",
        ),
    ],
)


# --- the role center at 9:00: shared executions -------------------------------------------


@dataclass(frozen=True)
class RoleCenterParams:
    sessions: int = 200  # users opening the role center at once
    processes: int = 10  # asyncio client processes the sessions are spread over
    query_ms: float = 20.0  # each cue's read of the customer table


ROLE_CENTER_WORKERS: Final = 4  # a small server at the 9:00 rush


def _role_center_plan(p: RoleCenterParams) -> list[Measurement]:
    crowd = {"sessions": p.sessions, "processes": p.processes, "query_ms": p.query_ms}
    return [
        Measurement(
            "plain",
            "pbt-server, plain codeunits (every cue runs)",
            sharing.role_center,
            {**crowd, "cues": CUES},
            broker=True,
        ),
        Measurement(
            "shared",
            "pbt-server, shared=True (identical cues attach to one execution)",
            sharing.role_center,
            {**crowd, "cues": SHARED_CUES},
            broker=True,
        ),
    ]


ROLE_CENTER = Figure(
    name="rolecenter",
    about=f"{RoleCenterParams.sessions} sessions open the same {len(CUES)}-cue role center at "
    "once (a 20 ms read each): executions run and time until every cue is filled, plain vs "
    "shared=True",
    params=RoleCenterParams(),
    quick=RoleCenterParams(sessions=20, processes=2),
    broker={"Workers": {"Count": str(ROLE_CENTER_WORKERS)}},
    plan=_role_center_plan,
    tables=lambda p: [
        Table(
            f"Role center at 9:00: {p.sessions} sessions open the same {len(CUES)} cues at once "
            f"(a {p.query_ms:g} ms read each, identical parameters), {ROLE_CENTER_WORKERS} workers",
            [
                ("executions", "executions run"),
                ("attaches", "tasks attached"),
                ("all_filled_ms", "every cue filled (ms)"),
                ("session_p50_ms", "a session's cues filled, p50 (ms)"),
            ],
        )
    ],
    targets=lambda p: [
        Ratio(
            "role center, shared=True: executions run vs plain",
            "shared",
            "plain",
            "executions",
            None,
            detail=f"{p.sessions} sessions x {len(CUES)} cues",
        ),
        Ratio(
            "role center, shared=True: every cue filled vs plain",
            "shared",
            "plain",
            "all_filled_ms",
            None,
            unit="ms",
        ),
    ],
)


# --- shared=True on a miss, and a cache hit, against a no-op ------------------------------


@dataclass(frozen=True)
class SharingParams:
    n: int = 2000  # sequential round trips
    warmup: int = 200


def _sharing_plan(p: SharingParams) -> list[Measurement]:
    calls = {"n": p.n, "warmup": p.warmup}
    return [
        Measurement(
            "noop",
            "plain no-op (unique parameters)",
            sharing.round_trip,
            {**calls, "codeunit": NOOP, "expect": "run"},
            broker=True,
        ),
        Measurement(
            "miss",
            "shared=True no-op, unique parameters (every task a miss)",
            sharing.round_trip,
            {**calls, "codeunit": SHARED_NOOP, "expect": "miss"},
            broker=True,
        ),
        Measurement(
            "hit",
            "shared=True, cache=True no-op, the same parameters (served from the cache)",
            sharing.round_trip,
            {**calls, "codeunit": CACHED_NOOP, "expect": "hit"},
            broker=True,
        ),
    ]


SHARING = Figure(
    name="sharing",
    about="sequential round trip of a shared=True no-op that always misses, and of a cache "
    "hit, against a plain no-op",
    params=SharingParams(),
    quick=SharingParams(n=200, warmup=20),
    plan=_sharing_plan,
    tables=lambda p: [
        Table(
            "Shared executions and the cache: sequential round trip, sync client (µs)",
            [("p50_us", "p50"), ("p99_us", "p99")],
        )
    ],
    targets=lambda p: [
        Ratio(
            "cache hit round trip p50 < 1x a no-op's",
            "hit",
            "noop",
            "p50_us",
            1.0,
            unit="µs",
        ),
        Ratio(
            "shared=True on a miss: round trip p50 ≤ 1.05x a no-op's",
            "miss",
            "noop",
            "p50_us",
            1.05,
            unit="µs",
        ),
    ],
)


FIGURES: Final[Sequence[Figure[Any]]] = (
    LATENCY,
    THROUGHPUT,
    TIMEOUT,
    CANCEL,
    KILL,
    STORM,
    FAIRNESS,
    SCALE,
    RSS,
    METRICS,
    ROLE_CENTER,
    SHARING,
)
