"""The broker's counts for operators (telemetry.py), the dashboard's JSON and the Prometheus
text made from them: real scheduler tasks, a fake clock, no processes."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pbt_server.config import AsyncProcessingSection
from pbt_server.dashboard import WINDOW, dashboard_state, percentile
from pbt_server.metrics import Snapshot, exposition
from pbt_server.report import SLOT_STATES
from pbt_server.sessions import Scheduler, Session, Task, TaskState
from pbt_server.telemetry import BUCKETS, KILL_CAUSES, MAX_SERIES, OTHER_CODE, Telemetry
from tests.support import FakeClock

NOOP, SLOW = 1, 2


def make() -> tuple[Scheduler, Telemetry, FakeClock, Session]:
    clock = FakeClock(1000.0)
    limits = AsyncProcessingSection(
        max_concurrency=5,
        max_queue_length=1000,
        default_timeout_ms=60_000,
        max_timeout_ms=60_000,
        progress_interval_ms=100,
    )
    scheduler = Scheduler(limits, {NOOP, SLOW}, clock=clock)
    session = scheduler.open_session()
    scheduler.open_page(session, "P", "R1")
    return scheduler, Telemetry(clock), clock, session


def enqueue(scheduler: Scheduler, session: Session, codeunit: int = NOOP) -> Task:
    return scheduler.enqueue(session, 1, codeunit, None, None, "Error")


def start(scheduler: Scheduler) -> Task:
    task = scheduler.next_task()
    assert task is not None
    scheduler.started(task)
    return task


def complete(scheduler: Scheduler, telemetry: Telemetry, task: Task) -> None:
    scheduler.finish(task, TaskState.COMPLETED)
    telemetry.task_ended(task, {"op": "completed", "task": task.id, "results": {}})


def fail(scheduler: Scheduler, telemetry: Telemetry, task: Task, code: str) -> None:
    scheduler.finish(task, TaskState.FAILED)
    telemetry.task_ended(task, {"op": "failed", "task": task.id, "code": code})


def cancel(scheduler: Scheduler, telemetry: Telemetry, session: Session, task: Task) -> None:
    assert scheduler.cancel(session, task.id) is task
    telemetry.task_ended(task, {"op": "cancelled", "task": task.id, "code": "Canceled"})


def test_outcomes_are_counted_by_outcome_code_and_codeunit() -> None:
    scheduler, telemetry, _clock, session = make()
    for _ in range(3):
        enqueue(scheduler, session)
        complete(scheduler, telemetry, start(scheduler))
    enqueue(scheduler, session, SLOW)
    fail(scheduler, telemetry, start(scheduler), "ValueError")
    enqueue(scheduler, session, SLOW)
    fail(scheduler, telemetry, start(scheduler), "ChildSessionTaskTimeout")
    cancel(scheduler, telemetry, session, enqueue(scheduler, session))
    counters = telemetry.snapshot()
    assert counters.outcomes == {
        ("completed", "", NOOP): 3,
        ("error", "ValueError", SLOW): 1,
        ("error", "ChildSessionTaskTimeout", SLOW): 1,
        ("cancelled", "Canceled", NOOP): 1,
    }
    assert counters.kills == dict.fromkeys(KILL_CAUSES, 0)
    telemetry.worker_ended("timeout")
    telemetry.worker_ended("recycle")
    telemetry.worker_ended("recycle")
    kills = telemetry.snapshot().kills
    assert (kills["timeout"], kills["recycle"], kills["crash"]) == (1, 2, 0)


def test_wait_is_enqueue_to_start_and_run_is_start_to_outcome() -> None:
    scheduler, telemetry, clock, session = make()
    enqueue(scheduler, session)
    clock.advance(2**-8)  # 3.9 ms (binary fractions: the sums below are exact)
    task = start(scheduler)
    clock.advance(0.25)
    complete(scheduler, telemetry, task)
    timings = telemetry.snapshot().timings[NOOP]
    assert timings.wait.count == timings.run.count == 1
    assert (timings.wait.total, timings.run.total) == (2**-8, 0.25)
    assert timings.wait.counts[BUCKETS.index(0.005)] == 1  # in (2.5 ms, 5 ms]
    assert timings.run.counts[BUCKETS.index(0.25)] == 1  # exactly a bound: that bound's bucket
    cumulative = timings.wait.cumulative()
    assert cumulative[BUCKETS.index(0.0025)] == 0
    assert cumulative[BUCKETS.index(0.005)] == cumulative[-1] == 1


def test_a_cancelled_task_has_a_wait_only_if_it_started_and_never_a_run() -> None:
    scheduler, telemetry, clock, session = make()
    running = enqueue(scheduler, session)
    waiting = enqueue(scheduler, session, SLOW)
    clock.advance(0.5)
    start(scheduler)
    cancel(scheduler, telemetry, session, waiting)  # never started: no times at all
    clock.advance(1.0)
    cancel(scheduler, telemetry, session, running)
    counters = telemetry.snapshot(history=True)
    assert SLOW not in counters.timings
    assert counters.timings[NOOP].wait.count == 1
    assert counters.timings[NOOP].run.count == 0
    [(_, codeunit, wait, run)] = counters.recent
    assert (codeunit, run) == (NOOP, None)
    assert wait == pytest.approx(0.5)


def test_a_codeunit_that_makes_up_codes_cannot_grow_the_series_without_bound() -> None:
    scheduler, telemetry, _clock, session = make()
    for n in range(MAX_SERIES + 5):
        enqueue(scheduler, session)
        fail(scheduler, telemetry, start(scheduler), f"CUST:{n}")
    outcomes = telemetry.snapshot().outcomes
    assert len(outcomes) == MAX_SERIES + 1
    assert outcomes["error", OTHER_CODE, NOOP] == 5
    assert sum(outcomes.values()) == MAX_SERIES + 5  # still every task, exactly once


def test_a_snapshot_is_a_copy() -> None:
    scheduler, telemetry, _clock, session = make()
    enqueue(scheduler, session)
    complete(scheduler, telemetry, start(scheduler))
    before = telemetry.snapshot(history=True)
    enqueue(scheduler, session)
    complete(scheduler, telemetry, start(scheduler))
    telemetry.worker_ended("crash")
    assert before.outcomes == {("completed", "", NOOP): 1}
    assert before.timings[NOOP].run.count == 1
    assert before.kills["crash"] == 0
    assert sum(n for _, counts in before.seconds for n in counts.values()) == 1


def test_the_dashboard_sees_outcomes_per_second_rates_and_percentiles() -> None:
    scheduler, telemetry, clock, session = make()
    clock.now = 2000.0
    # 30 s ago: 4 completed; over the last 10 whole seconds: 20 completed and 5 errors;
    # in the current second (not yet in the rate): 3 more.
    for _ in range(4):
        enqueue(scheduler, session)
        complete(scheduler, telemetry, start(scheduler))
    clock.now = 2020.0
    for n in range(25):
        clock.now = 2020.0 + n * 0.4
        enqueue(scheduler, session)
        task = start(scheduler)
        clock.advance(0.001 * (n + 1))  # runs of 1 ms .. 25 ms
        if n % 5 == 4:
            fail(scheduler, telemetry, task, "ValueError")
        else:
            complete(scheduler, telemetry, task)
    clock.now = 2030.5
    for _ in range(3):
        enqueue(scheduler, session)
        complete(scheduler, telemetry, start(scheduler))
    state = {
        "totals": {"sessions": 1, "workers": dict.fromkeys(SLOT_STATES, 0)},
        "sessions": [],
        "workers": [],
    }
    json = dashboard_state(telemetry.snapshot(history=True), state, {}, broker_rss=1, healthy=None)
    series = json["series"]
    assert series["completed"][WINDOW - 1] == 3  # now
    assert series["completed"][WINDOW - 1 - 30] == 4  # 30 s ago
    assert sum(series["completed"]) == 4 + 20 + 3
    assert sum(series["error"]) == 5
    assert json["tasks_per_second"] == pytest.approx(25 / 10)
    assert json["outcomes"] == [
        {"outcome": "completed", "code": "", "count": 27},
        {"outcome": "error", "code": "ValueError", "count": 5},
    ]
    assert json["ended"] == {"completed": 27, "error": 5, "cancelled": 0}
    times = json["times"]
    assert times["samples"] == 4 + 25 + 3  # every task that started in the last minute
    runs = times["run"]
    assert runs["max"] == pytest.approx(0.025)
    assert json["healthy"] is True


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    assert percentile([], 50) is None


def test_the_prometheus_text_adds_up() -> None:
    scheduler, telemetry, clock, session = make()
    for n in range(6):
        enqueue(scheduler, session, SLOW if n % 3 == 0 else NOOP)
        clock.advance(0.002)
        task = start(scheduler)
        clock.advance(0.03)
        complete(scheduler, telemetry, task)
    telemetry.worker_ended("memory")
    workers = dict.fromkeys(SLOT_STATES, 0) | {"idle": 2}
    state = {
        "totals": {
            "sessions": 3,
            "pages": 4,
            "waiting": 5,
            "running": 1,
            "workers": workers,
            "standby": "idle",
        }
    }
    snap = Snapshot(telemetry.snapshot(), state, max_sessions=4096, stopping=False)
    body, content_type = exposition(snap, {"0": 123, "standby": 456}, 789, accept="")
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }

    def get(name: str, **labels: str) -> float:
        return samples[name, tuple(sorted(labels.items()))]

    assert get("pbt_tasks_total", outcome="completed", code="", codeunit=str(NOOP)) == 4
    assert get("pbt_tasks_total", outcome="completed", code="", codeunit=str(SLOW)) == 2
    assert get("pbt_task_run_seconds_count", codeunit=str(NOOP)) == 4
    assert get("pbt_task_run_seconds_bucket", codeunit=str(NOOP), le="0.025") == 0
    assert get("pbt_task_run_seconds_bucket", codeunit=str(NOOP), le="0.05") == 4
    assert get("pbt_task_run_seconds_bucket", codeunit=str(NOOP), le="+Inf") == 4
    assert get("pbt_task_wait_seconds_sum", codeunit=str(SLOW)) == pytest.approx(0.004)
    assert get("pbt_sessions") == 3
    assert get("pbt_sessions_max") == 4096
    assert get("pbt_tasks_waiting") == 5
    assert get("pbt_workers", state="idle") == 2
    assert get("pbt_workers", state="down") == 0
    assert get("pbt_standby_ready") == 1
    assert get("pbt_worker_rss_bytes", slot="standby") == 456
    assert get("pbt_broker_rss_bytes") == 789
    assert get("pbt_worker_kills_total", cause="memory") == 1
    assert get("pbt_worker_kills_total", cause="cancel") == 0
    assert get("pbt_up") == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)
    openmetrics, content_type = exposition(
        snap, {}, 0, accept="application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert openmetrics.endswith(b"# EOF\n")
