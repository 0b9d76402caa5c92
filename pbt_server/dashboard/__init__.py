"""The live dashboard: its files (``index.html``, ``dashboard.css``, ``dashboard.js``, no
build step, nothing from a CDN) and :func:`dashboard_state`, the JSON it polls every second.

The JSON is made for the dashboard, not as an interface: scripts should read
``pbt-server status --json`` or ``/metrics``. It has what the status report has (without the
sessions' contexts, which may name users, and only the busiest sessions), plus what only
the broker's telemetry knows: outcomes per second over the last minutes, tasks per second,
wait and run time percentiles over the latest tasks, worker kills by cause.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Final

from pbt_server.telemetry import OUTCOMES, Counters

WINDOW: Final = 300  # seconds of per-second outcomes shown
RATE_WINDOW: Final = 10  # seconds averaged for "tasks per second"
TIMES_WINDOW: Final = 60  # percentiles over the tasks that ended in the last minute
SESSIONS_SHOWN: Final = 50  # the busiest sessions, by waiting + running tasks

FILES: Final[Mapping[str, str]] = {
    "/": "index.html",
    "/index.html": "index.html",
    "/dashboard.css": "dashboard.css",
    "/dashboard.js": "dashboard.js",
}
TYPES: Final[Mapping[str, str]] = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
}


def read_file(name: str) -> tuple[bytes, str]:
    """A dashboard file's bytes and content type."""
    data = resources.files(__name__).joinpath(name).read_bytes()
    return data, TYPES[name.rpartition(".")[2]]


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0-100) of sorted values; None if there are none."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least the first
    return ordered[int(rank) - 1]


def _spread(values: list[float]) -> dict[str, float | None]:
    values.sort()
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1] if values else None,
    }


def dashboard_state(
    counters: Counters,
    state: Mapping[str, Any],
    server: Mapping[str, Any],
    *,
    broker_rss: int,
    healthy: str | None,
) -> dict[str, Any]:
    """The dashboard's JSON. ``state`` is ``report.live_state()`` with each worker's RSS
    filled in; ``healthy`` the health problem, or None."""
    now = int(counters.now)
    series = {outcome: [0] * WINDOW for outcome in OUTCOMES}  # index 0 = the oldest second
    recent_codes: dict[tuple[str, str], int] = {}
    for second, counts in counters.seconds:
        age = now - second
        if not 0 <= age < WINDOW:
            continue
        for (outcome, code), n in counts.items():
            series[outcome][WINDOW - 1 - age] += n
            recent_codes[outcome, code] = recent_codes.get((outcome, code), 0) + n
    # The current second is still filling: the rate is over the whole seconds before it.
    ended = sum(sum(series[o][WINDOW - 1 - RATE_WINDOW : WINDOW - 1]) for o in OUTCOMES)
    waits: list[float] = []
    runs: list[float] = []
    by_codeunit: dict[int, tuple[list[float], list[float]]] = {}
    for at, codeunit, wait, run in counters.recent:
        if counters.now - at > TIMES_WINDOW:
            continue
        mine = by_codeunit.setdefault(codeunit, ([], []))
        waits.append(wait)
        mine[0].append(wait)
        if run is not None:
            runs.append(run)
            mine[1].append(run)
    totals_by_outcome = dict.fromkeys(OUTCOMES, 0)
    for (outcome, _code, _codeunit), n in counters.outcomes.items():
        totals_by_outcome[outcome] += n
    return {
        "server": dict(server),
        "healthy": healthy is None,
        "problem": healthy,
        "totals": state["totals"],
        "sessions": state["sessions"],
        "workers": state["workers"],
        "broker_rss": broker_rss,
        "kills": counters.kills,
        "ended": totals_by_outcome,
        "window": WINDOW,
        "series": series,
        "outcomes": [
            {"outcome": outcome, "code": code, "count": n}
            for (outcome, code), n in sorted(
                recent_codes.items(), key=lambda item: (-item[1], item[0])
            )
        ],
        "tasks_per_second": ended / RATE_WINDOW,
        "times": {
            "window": TIMES_WINDOW,
            "samples": len(waits),
            "wait": _spread(waits),
            "run": _spread(runs),
            "codeunits": [
                {
                    "codeunit": codeunit,
                    "tasks": len(w),
                    "wait": _spread(w),
                    "run": _spread(r),
                }
                for codeunit, (w, r) in sorted(by_codeunit.items())
            ],
        },
    }
