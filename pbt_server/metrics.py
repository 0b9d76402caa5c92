"""The Prometheus metrics: families made from one snapshot of the broker, in the HTTP thread.

Needs ``prometheus-client`` (``pip install 'pbt-server[metrics]'``); the broker imports this
only when ``[Server] MetricsAddress`` is set. Nothing is registered in prometheus-client's
global registry: each scrape renders the snapshot it was given, plus the process metrics of
the broker (``process_*``, read from ``/proc`` in the scraping thread).

========================================== ========= ==========================================
metric                                     type      labels / meaning
========================================== ========= ==========================================
``pbt_tasks_total``                        counter   outcome (completed, error, cancelled), code
                                                     (the error or cancel code; "" for
                                                     completed), codeunit
``pbt_task_wait_seconds``                  histogram codeunit; enqueue -> the worker started it
``pbt_task_run_seconds``                   histogram codeunit; started -> outcome (not for
                                                     cancelled tasks)
``pbt_sessions``                           gauge     parent sessions open
``pbt_sessions_max``                       gauge     sessions allowed (MaxConnections, as fitted
                                                     to the open-file limit)
``pbt_pages``                              gauge     pages open
``pbt_tasks_waiting``                      gauge     tasks waiting in the sessions' queues
``pbt_tasks_running``                      gauge     tasks handed to a worker (starting, running)
``pbt_workers``                            gauge     state (booting, idle, starting, busy, down):
                                                     the Workers.Count slots
``pbt_standby_ready``                      gauge     1 while the booted spare worker is ready
``pbt_worker_rss_bytes``                   gauge     slot ("0".., "standby"): resident memory
``pbt_broker_rss_bytes``                   gauge     the broker process's resident memory
``pbt_worker_kills_total``                 counter   cause: why a worker was ended and replaced
                                                     (telemetry.KILL_CAUSES)
``pbt_up``                                 gauge     1; 0 while the server is stopping
``pbt_build_info``                         gauge     version
========================================== ========= ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import Collector
except ImportError as err:
    raise ImportError(
        "[Server] MetricsAddress needs the prometheus-client package:"
        " pip install 'pbt-server[metrics]'",
        name=err.name,
    ) from err

from pbt_server import __version__
from pbt_server.report import SLOT_STATES
from pbt_server.telemetry import BUCKETS, KILL_CAUSES, Counters

_LE = [*(f"{bound:g}" for bound in BUCKETS), "+Inf"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one scrape shows: the counts and the broker's state, copied on the loop."""

    counters: Counters
    state: Mapping[str, Any]  # report.live_state()
    max_sessions: int
    stopping: bool


def families(snap: Snapshot, rss: Mapping[str, int], broker_rss: int) -> Iterator[Metric]:
    """The ``pbt_*`` metric families of ``snap``; ``rss`` is each worker slot's memory."""
    counters = snap.counters
    tasks = CounterMetricFamily(
        "pbt_tasks",
        "Tasks that ended, by outcome (completed, error, cancelled), code and codeunit.",
        labels=["outcome", "code", "codeunit"],
    )
    for (outcome, code, codeunit), count in sorted(counters.outcomes.items()):
        tasks.add_metric([outcome, code, str(codeunit)], count)
    yield tasks
    wait = HistogramMetricFamily(
        "pbt_task_wait_seconds",
        "From enqueue until a worker started the task, by codeunit.",
        labels=["codeunit"],
    )
    run = HistogramMetricFamily(
        "pbt_task_run_seconds",
        "From the worker's start until the outcome (cancelled tasks excluded), by codeunit.",
        labels=["codeunit"],
    )
    for codeunit, timings in sorted(counters.timings.items()):
        for family, histogram in ((wait, timings.wait), (run, timings.run)):
            buckets = list(zip(_LE, histogram.cumulative(), strict=True))
            family.add_metric([str(codeunit)], buckets, histogram.total)
    yield wait
    yield run
    totals = snap.state["totals"]
    yield _gauge("pbt_sessions", "Parent sessions open.", totals["sessions"])
    yield _gauge("pbt_sessions_max", "Parent sessions allowed (MaxConnections).", snap.max_sessions)
    yield _gauge("pbt_pages", "Pages open.", totals["pages"])
    yield _gauge("pbt_tasks_waiting", "Tasks waiting in the sessions' queues.", totals["waiting"])
    yield _gauge(
        "pbt_tasks_running", "Tasks handed to a worker (starting or running).", totals["running"]
    )
    workers = GaugeMetricFamily(
        "pbt_workers", "Worker slots (Workers.Count) by state.", labels=["state"]
    )
    for state in SLOT_STATES:
        workers.add_metric([state], totals["workers"][state])
    yield workers
    yield _gauge(
        "pbt_standby_ready",
        "1 while the booted spare worker is ready to take a slot.",
        int(totals["standby"] == "idle"),
    )
    memory = GaugeMetricFamily(
        "pbt_worker_rss_bytes", "Resident memory of each worker.", labels=["slot"]
    )
    for slot, value in rss.items():
        memory.add_metric([slot], value)
    yield memory
    yield _gauge("pbt_broker_rss_bytes", "Resident memory of the broker process.", broker_rss)
    kills = CounterMetricFamily(
        "pbt_worker_kills",
        "Workers ended and replaced, by cause: killed (timeout, cancel, memory, no_ack,"
        " protocol), retired (recycle, leftovers) or lost (crash, boot_failure).",
        labels=["cause"],
    )
    for cause in (*KILL_CAUSES, *sorted(set(counters.kills) - set(KILL_CAUSES))):
        kills.add_metric([cause], counters.kills.get(cause, 0))
    yield kills
    yield _gauge("pbt_up", "1 while the server serves; 0 while it stops.", int(not snap.stopping))
    info = GaugeMetricFamily("pbt_build_info", "The pbt-server version.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class _Families(Collector):
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


_PROCESS = ProcessCollector(registry=None)


def exposition(
    snap: Snapshot, rss: Mapping[str, int], broker_rss: int, accept: str
) -> tuple[bytes, str]:
    """The scrape's body and content type: OpenMetrics if ``accept`` asks for it, else the
    Prometheus text format."""
    encoder, content_type = choose_encoder(accept)
    metrics = [*families(snap, rss, broker_rss), *_PROCESS.collect()]
    return encoder(_Families(metrics)), content_type
