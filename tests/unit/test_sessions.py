"""The scheduler's decisions, with plain objects and a fake clock (no processes)."""

from __future__ import annotations

import pytest

from pbt_server.budget import Budget, map_size, page_size
from pbt_server.config import AsyncProcessingSection
from pbt_server.errors import (
    InvalidParameters,
    MemoryBudgetExceeded,
    PageClosed,
    PageNotFound,
    QueueFull,
    UnknownCodeunit,
)
from pbt_server.sessions import Scheduler, Session, TaskState
from tests.support import FakeClock


def make(
    max_concurrency: int = 5,
    max_queue_length: int = 100,
    clock: FakeClock | None = None,
    budget: Budget | None = None,
):
    limits = AsyncProcessingSection(
        max_concurrency=max_concurrency,
        max_queue_length=max_queue_length,
        default_timeout_ms=120_000,
        max_timeout_ms=600_000,
        progress_interval_ms=100,
    )
    return Scheduler(limits, {1, 2}, clock=clock or FakeClock(), budget=budget)


def enqueue(s: Scheduler, session: Session, page: int = 1, **kw):
    return s.enqueue(
        session, page, kw.get("codeunit", 1), kw.get("parameters"), kw.get("timeout"), "Error"
    )


def test_task_ids_count_from_one_per_session_and_are_never_reused():
    s = make()
    a, b = s.open_session(), s.open_session()
    s.open_page(a, "P", "")
    s.open_page(b, "P", "")
    first = enqueue(s, a)
    assert s.cancel(a, first.id) is first
    assert [enqueue(s, a).id, enqueue(s, a).id] == [2, 3]
    assert enqueue(s, b).id == 1


@pytest.mark.parametrize(
    ("asked", "effective"),
    [(None, 120_000), (0, 120_000), (-5, 120_000), (1, 1), (10_000, 10_000), (10**9, 600_000)],
)
def test_timeout_default_and_clamp(asked, effective):
    s = make()
    session = s.open_session()
    s.open_page(session, "P", "")
    assert enqueue(s, session, timeout=asked).timeout_ms == effective


def test_concurrency_limit_per_session_and_fifo_order():
    s = make(max_concurrency=2)
    session = s.open_session()
    s.open_page(session, "P", "")
    tasks = [enqueue(s, session) for _ in range(4)]
    started = [s.next_task(), s.next_task()]
    assert started == tasks[:2]
    assert s.next_task() is None  # two running: the rest wait
    s.started(tasks[0])
    s.finish(tasks[0], TaskState.COMPLETED)
    assert s.next_task() is tasks[2]


def test_queue_length_counts_waiting_tasks_only():
    s = make(max_concurrency=1, max_queue_length=2)
    session = s.open_session()
    s.open_page(session, "P", "")
    running = enqueue(s, session)
    assert s.next_task() is running
    enqueue(s, session)
    enqueue(s, session)
    with pytest.raises(QueueFull, match="2 tasks waiting") as caught:
        enqueue(s, session)
    assert caught.value.code == "ChildSessionQueueFull"
    # a waiting task cancelled frees a queue place at once; the refused enqueue used no id
    s.cancel(session, 2)
    assert enqueue(s, session).id == 4


def test_a_busy_session_does_not_starve_another():
    s = make(max_concurrency=5, max_queue_length=1000)
    busy, quiet = s.open_session(), s.open_session()
    s.open_page(busy, "P", "")
    s.open_page(quiet, "P", "")
    for _ in range(100):
        enqueue(s, busy)
    first = s.next_task()  # one worker took a busy task
    assert first is not None
    assert first.session is busy
    single = enqueue(s, quiet)
    # the next free worker goes to the quiet session, not to the 99 waiting busy tasks
    assert s.next_task() is single


def test_round_robin_alternates_between_sessions():
    s = make(max_concurrency=100, max_queue_length=1000)
    sessions = [s.open_session() for _ in range(3)]
    for session in sessions:
        s.open_page(session, "P", "")
        for _ in range(3):
            enqueue(s, session)
    order = [s.next_task().session.id for _ in range(9)]
    assert order == [1, 2, 3, 1, 2, 3, 1, 2, 3]


def test_record_change_cancels_tasks_of_the_old_record_only():
    s = make()
    session = s.open_session()
    page = s.open_page(session, "Customer Card", "Customer: 10000")
    old = [enqueue(s, session, page.id) for _ in range(2)]
    s.next_task()  # one of them is running
    assert s.set_record(session, page.id, "Customer: 10000") == []  # same record: nothing
    cancelled = s.set_record(session, page.id, "Customer: 20000")
    assert cancelled == old
    assert all(t.state is TaskState.CANCELLED and t.cancel_reason == "RecordChanged" for t in old)
    new = enqueue(s, session, page.id)
    assert new.record == "Customer: 20000"
    assert session.running == 0
    assert session.waiting == 1


def test_page_close_cancels_its_tasks_and_refuses_new_ones():
    s = make()
    session = s.open_session()
    page = s.open_page(session, "P", "")
    other = s.open_page(session, "Q", "")
    mine = enqueue(s, session, page.id)
    theirs = enqueue(s, session, other.id)
    assert s.close_page(session, page.id) == [mine]
    assert theirs.state is TaskState.WAITING
    with pytest.raises(PageClosed):
        enqueue(s, session, page.id)
    with pytest.raises(PageNotFound):
        enqueue(s, session, 99)


def test_session_close_cancels_everything_and_frees_slots():
    s = make(max_concurrency=1)
    session = s.open_session()
    s.open_page(session, "P", "")
    running = enqueue(s, session)
    waiting = enqueue(s, session)
    assert s.next_task() is running
    assert s.close_session(session) == [running, waiting]
    assert s.next_task() is None
    assert session.id not in s.sessions


def test_cancel_unknown_or_finished_returns_none():
    s = make()
    session = s.open_session()
    s.open_page(session, "P", "")
    task = enqueue(s, session)
    s.next_task()
    s.started(task)
    s.finish(task, TaskState.COMPLETED)
    assert s.cancel(session, task.id) is None
    assert s.cancel(session, 12345) is None


def test_cancelled_waiting_tasks_are_skipped_and_compacted():
    s = make(max_concurrency=1, max_queue_length=10)
    session = s.open_session()
    s.open_page(session, "P", "")
    running = enqueue(s, session)
    s.next_task()
    # a client that enqueues and cancels forever while its session is saturated
    for _ in range(10_000):
        s.cancel(session, enqueue(s, session).id)
    assert len(session.queue) < 200
    keep = enqueue(s, session)
    s.started(running)
    s.finish(running, TaskState.COMPLETED)
    assert s.next_task() is keep


@pytest.mark.parametrize(
    "parameters",
    [{"a": 1}, {1: "a"}, ["a"], "text", {"a": None}, {"a": b"bytes"}],
)
def test_bad_parameters_are_refused_with_the_reason(parameters):
    s = make()
    session = s.open_session()
    s.open_page(session, "P", "")
    with pytest.raises(InvalidParameters):
        enqueue(s, session, parameters=parameters)
    assert session.waiting == 0
    assert session.last_task_id == 0


def test_unknown_codeunit_is_refused():
    s = make()
    session = s.open_session()
    s.open_page(session, "P", "")
    with pytest.raises(UnknownCodeunit, match="codeunit 77"):
        enqueue(s, session, codeunit=77)


def test_a_tasks_clock_starts_at_the_hand_over_not_the_enqueue():
    clock = FakeClock()
    s = make(clock=clock)
    session = s.open_session()
    s.open_page(session, "P", "")
    task = enqueue(s, session)
    clock.advance(5)
    s.next_task()
    clock.advance(1)
    s.started(task)  # found taken at its first check: the clock stays at the hand-over
    assert task.enqueued_at == 1000.0
    assert task.started_at == 1005.0


def test_a_task_taken_late_has_its_clock_start_where_the_take_was_seen():
    clock = FakeClock()
    s = make(clock=clock)
    session = s.open_session()
    s.open_page(session, "P", "")
    task = enqueue(s, session)
    s.next_task()
    s.started(task, at=1002.5)  # still in the worker's pipe at its deadline, taken later
    assert task.started_at == 1002.5
    assert task.state is TaskState.RUNNING


def test_a_task_whose_worker_died_before_starting_it_goes_back_to_the_head_once():
    s = make(max_concurrency=1)
    session = s.open_session()
    s.open_page(session, "P", "")
    first, second = enqueue(s, session), enqueue(s, session)
    assert s.next_task() is first
    assert s.worker_lost(first)  # never taken off its worker's pipe: requeued
    assert first.started_at is None  # its clock starts again at its next hand-over
    assert (session.running, session.waiting) == (0, 2)
    assert s.next_task() is first  # ahead of `second`
    assert first.requeued
    assert not s.worker_lost(first)  # a second loss before starting: the caller fails it
    assert first.state is TaskState.STARTING
    s.finish(first, TaskState.FAILED)
    assert s.next_task() is second


def test_a_task_that_had_started_is_never_requeued():
    s = make()
    session = s.open_session()
    s.open_page(session, "P", "")
    task = enqueue(s, session)
    s.next_task()
    s.started(task)
    assert not s.worker_lost(task)
    assert task.state is TaskState.RUNNING
    assert not task.requeued


def test_waiting_parameters_take_from_the_memory_budget_until_the_task_ends():
    small = {"k": "v" * 100}
    budget = Budget(limit=2 * map_size(small) + map_size({}) + page_size("P", "") + 10)
    s = make(budget=budget)
    session = s.open_session()
    s.open_page(session, "P", "")
    first = enqueue(s, session, parameters=small)
    second = enqueue(s, session, parameters=small)
    with pytest.raises(MemoryBudgetExceeded, match="MaxBufferedMB") as caught:
        enqueue(s, session, parameters=small)
    assert caught.value.code == "ServerMemoryBudget"
    assert session.waiting == 2  # the refused task took nothing
    s.cancel(session, first.id)
    enqueue(s, session, parameters=small)  # room again
    s.next_task()
    s.started(second)
    s.finish(second, TaskState.COMPLETED)
    s.close_session(session)
    assert budget.used == 0


def test_page_limit_per_session():
    from pbt_server.errors import TooManyPages
    from pbt_server.sessions import MAX_PAGES

    s = make()
    session = s.open_session()
    for i in range(MAX_PAGES):
        s.open_page(session, f"P{i}", "")
    with pytest.raises(TooManyPages):
        s.open_page(session, "one too many", "")
    s.close_page(session, 1)
    s.open_page(session, "room again", "")


def test_tally_summarises_outcomes_by_kind_and_code():
    from pbt_server.report import Tally

    tally = Tally()
    for kind, code in [("completed", "")] * 3 + [
        ("failed", "ValueError"),
        ("cancelled", "RecordChanged"),
    ]:
        tally.add(kind, code)
    assert tally.take() == "3 completed, 1 failed (ValueError 1), 1 cancelled (RecordChanged 1)"
    assert tally.take() == ""


def test_pages_and_contexts_take_from_the_memory_budget_until_they_close():
    budget = Budget(limit=50_000)
    s = make(budget=budget)
    session = s.open_session({"user": "x" * 10_000})
    taken = budget.used
    assert taken > 10_000
    page = s.open_page(session, "P" * 4000, "R" * 4000)
    # A text of 4-byte characters counts as what it holds, not as its length.
    wide = s.open_page(session, "\U0001f600" * 4000, "")
    assert budget.used - taken > 8000 + 16_000
    with pytest.raises(MemoryBudgetExceeded, match="no room for a page"):
        s.open_page(session, "Q" * 4000, "\U0001f600" * 4000)
    s.close_page(session, wide.id)
    s.set_record(session, page.id, "")  # a shorter record id gives back what it held
    assert budget.used < taken + 4000 + 1000
    with pytest.raises(MemoryBudgetExceeded, match="no room for a session's context"):
        s.open_session({"big": "y" * 60_000})
    s.close_session(session)
    assert budget.used == 0


# --- shared executions ----------------------------------------------------------------------


def shared_scheduler(**kw):
    from pbt_server.codeunits import Sharing

    s = make(**kw)
    s.sharing = {2: Sharing()}
    return s


def test_identical_shared_tasks_attach_to_one_execution():
    s = shared_scheduler()
    a, b = s.open_session(), s.open_session()
    s.open_page(a, "P", "")
    s.open_page(b, "P", "")
    ta = enqueue(s, a, codeunit=2, parameters={"k": "v"}, timeout=5000)
    tb = enqueue(s, b, codeunit=2, parameters={"k": "v"}, timeout=9000)
    other = enqueue(s, b, codeunit=2, parameters={"k": "w"})
    assert ta.state is tb.state is TaskState.ATTACHED
    assert ta.execution is tb.execution is not other.execution
    execution = s.next_task()
    assert execution is ta.execution
    assert execution.timeout_ms == 5000  # the first task's
    assert (a.waiting, a.running, b.waiting, b.running) == (1, 0, 2, 0)
    assert s.attaches == 1
    s.started(execution)
    assert tb.started_at == execution.started_at
    ended = s.end_execution(execution, TaskState.COMPLETED)
    assert ended == [ta, tb]
    assert [ta.state, tb.state] == [TaskState.COMPLETED] * 2
    assert (a.waiting, b.waiting) == (0, 1)
    # ended: an identical task starts a new execution
    again = enqueue(s, a, codeunit=2, parameters={"k": "v"})
    assert again.execution is not execution


def test_the_last_cancel_abandons_the_execution():
    s = shared_scheduler()
    a, b = s.open_session(), s.open_session()
    s.open_page(a, "P", "R1")
    s.open_page(b, "P", "R1")
    ta = enqueue(s, a, codeunit=2)
    tb = enqueue(s, b, codeunit=2)
    execution = s.next_task()
    assert s.cancel(a, ta.id) is ta
    assert s.take_abandoned() == []
    assert s.set_record(b, 1, "R2") == [tb]  # the last attached one goes
    assert s.take_abandoned() == [execution]
    assert execution.state is TaskState.CANCELLED
    assert (s.shared.running, a.waiting, b.waiting) == (0, 0, 0)
    assert enqueue(s, a, codeunit=2).execution is not execution


def test_a_requeued_execution_keeps_its_attached_tasks():
    s = shared_scheduler()
    a = s.open_session()
    s.open_page(a, "P", "")
    ta = enqueue(s, a, codeunit=2)
    execution = s.next_task()
    assert s.worker_lost(execution)  # never started: it runs elsewhere, once
    tb = enqueue(s, a, codeunit=2)
    assert tb.execution is execution
    assert s.next_task() is execution
    assert s.end_execution(execution, TaskState.FAILED) == [ta, tb]


def test_after_a_reload_identical_tasks_attach_only_to_executions_not_yet_handed_out():
    s = shared_scheduler()
    a = s.open_session()
    s.open_page(a, "P", "")
    running = enqueue(s, a, codeunit=2, parameters={"k": "running"}).execution
    waiting = enqueue(s, a, codeunit=2, parameters={"k": "waiting"}).execution
    assert s.next_task() is running
    s.started(running)
    running.cacheable = True
    s.renew_executions()  # the reload: new code from now on
    assert running.cacheable is False  # what the old code returns is not cached
    late = enqueue(s, a, codeunit=2, parameters={"k": "running"})
    assert late.execution is not running  # a new run, on the new code
    assert enqueue(s, a, codeunit=2, parameters={"k": "waiting"}).execution is waiting
    ended = s.end_execution(running, TaskState.COMPLETED)  # the old run ends cleanly
    assert len(ended) == 1
    assert enqueue(s, a, codeunit=2, parameters={"k": "running"}).execution is late.execution
