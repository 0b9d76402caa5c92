"""The chaos ledger's checks, on hand-made histories (no broker): it must see what it claims to."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    CancelReason,
    ConnectionLost,
    PbtError,
)
from tests.chaos.episodes import run_blocking
from tests.chaos.ledger import (
    IterRec,
    Ledger,
    PageRec,
    ProgressRec,
    Reload,
    TaskRec,
    Write,
    classify,
    counted,
    cross_violations,
    expected_results,
    of_codeunit,
    scrape_violations,
)
from tests.chaos_codeunits import CHAOS_CACHED, CHAOS_PER_CONTEXT, CHAOS_SHARED


@dataclass
class FakePage:
    id: int
    record_id: str


@dataclass
class FakeHandle:
    id: int
    resolved: bool = True

    def done(self) -> bool:
        return self.resolved


def make_ledger(*, strict: bool = True) -> tuple[Ledger, PageRec]:
    ledger = Ledger(seed=7, client=1, seq=3, strict=strict)
    ledger.session_id = 42
    return ledger, PageRec(FakePage(1, "R1"), seq=1)


def enqueue(ledger: Ledger, page: PageRec, *, mode: str = "fast", level: str = "Error") -> TaskRec:
    rec = TaskRec(
        token=f"t{len(ledger.tasks) + 1}",
        mode=mode,
        page=page,
        gen=page.gen,
        record=page.page.record_id,
        params={"mode": mode, "token": f"t{len(ledger.tasks) + 1}"},
        level=level,
        handled=False,
        raise_in_trigger=False,
    )
    expected = ledger.register(rec)
    ledger.accepted(rec, FakeHandle(expected), at=0.0)
    return rec


def complete(ledger: Ledger, rec: TaskRec, results: dict[str, str] | None = None) -> None:
    """The broker's event, the trigger, and the handle's outcome, as a correct run has them."""
    results = expected_results(rec, ledger.session_id) if results is None else results
    ledger.on_frame({"op": "completed", "task": rec.task_id, "page": rec.page.id, "results": {}})
    ledger.trigger_completed(rec.page, rec.task_id, results)
    ledger.observe(rec, ("completed", "", "", results))
    rec.final = rec.first


def verified(ledger: Ledger, ended: str = "natural") -> list[str]:
    ledger.ended = ended
    ledger.verify()
    return ledger.violations


def test_a_correct_history_has_no_violation() -> None:
    ledger, page = make_ledger()
    for _ in range(3):
        complete(ledger, enqueue(ledger, page))
    assert verified(ledger) == []
    assert ledger.counts["outcome:completed"] == 3
    assert ledger.counts["trigger:completed"] == 3


def test_a_duplicated_outcome_event_is_reported_by_task() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    complete(ledger, rec)
    ledger.on_frame({"op": "completed", "task": rec.task_id, "page": page.id, "results": {}})
    (first, *_) = verified(ledger)
    assert "the broker sent 2 outcome events" in first
    assert f"task {rec.task_id} token {rec.token}" in first
    assert "seed 7 client 1 episode 3 session 42" in first


def test_a_task_without_outcome_is_lost() -> None:
    ledger, page = make_ledger()
    complete(ledger, enqueue(ledger, page))
    lost = enqueue(ledger, page)
    violations = verified(ledger)
    assert len(violations) == 1
    assert "no outcome (lost task)" in violations[0]
    assert f"token {lost.token}" in violations[0]


def test_results_of_another_task_are_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    complete(ledger, rec, dict(expected_results(rec, 42), token="someone-else"))
    assert any("are not this task's identity" in v for v in verified(ledger))


def test_an_outcome_event_for_another_page_is_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    results = expected_results(rec, 42)
    ledger.on_frame({"op": "completed", "task": rec.task_id, "page": 99, "results": {}})
    ledger.trigger_completed(page, rec.task_id, results)
    ledger.observe(rec, ("completed", "", "", results))
    rec.final = rec.first
    assert any("outcome event for page 99" in v for v in verified(ledger))


def test_a_cancel_nobody_asked_for_is_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    ledger.on_frame(
        {"op": "cancelled", "task": rec.task_id, "page": 1, "code": CancelReason.CANCELED}
    )
    ledger.observe(rec, ("cancelled", CancelReason.CANCELED, "", None))
    rec.final = rec.first
    assert any("which nothing asked for" in v for v in verified(ledger))


def test_a_record_change_explains_its_cancellation() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    page.gen += 1  # set_record began
    ledger.on_frame({"op": "completed", "task": rec.task_id, "page": 1, "results": {}})
    ledger.observe(rec, ("cancelled", CancelReason.RECORD_CHANGED, "", None))
    page.settled_gen = page.gen
    ledger.expect_done([rec], "set_record()", {CancelReason.RECORD_CHANGED})
    rec.final = rec.first
    assert verified(ledger) == []


def test_a_trigger_after_the_record_changed_is_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    page.gen += 1
    complete(ledger, rec)  # the trigger ran on the moved page
    assert any("after the page moved" in v for v in verified(ledger))


def test_an_unhandled_error_needs_its_notification() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page, mode="raise", level="Warning")
    text = f"raised by {rec.token} (task {rec.task_id})"
    ledger.on_frame({"op": "failed", "task": rec.task_id, "page": 1, "code": "CHAOS:Raised"})
    assert ledger.trigger_error(page, rec.task_id, "CHAOS:Raised", text, "") is False
    ledger.observe(rec, ("error", "CHAOS:Raised", text, None))
    rec.final = rec.first
    assert ledger.due() == 1  # the notification is still to come
    assert any("missing notification" in v for v in verified(ledger))


def test_an_outcome_that_changes_is_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page)
    complete(ledger, rec)
    rec.final = ("cancelled", CancelReason.CANCELED, "", None)
    assert any("the handle's outcome changed" in v for v in verified(ledger))


def test_task_ids_must_count_up() -> None:
    ledger, page = make_ledger()
    rec = TaskRec("t", "fast", page, 0, "R1", {}, "Error", False, False)
    ledger.register(rec)
    ledger.accepted(rec, FakeHandle(5), at=0.0)
    assert "task id 5 after 0" in ledger.violations[0]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, ("completed", "", "", {"a": "b"})),
        (
            BackgroundTaskCanceled("x", code=CancelReason.CANCELED),
            ("cancelled", CancelReason.CANCELED, "x", None),
        ),
        (BackgroundTaskError("boom", code="E1"), ("error", "E1", "boom", None)),
        (ConnectionLost("gone"), ("lost", "ConnectionLost", "gone", None)),
        (PbtError("odd", code="Odd"), ("other", "Odd", "odd", None)),
        (ValueError("v"), ("other", "ValueError", "v", None)),
    ],
)
def test_classify(error: BaseException | None, expected: tuple[object, ...]) -> None:
    assert classify(error, {"a": "b"} if error is None else None) == expected


def test_run_blocking_runs_a_coroutine_that_never_suspends() -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    async def outer() -> int:
        return await add(1, 2) * 2

    assert run_blocking(outer()) == 6


def test_run_blocking_refuses_a_coroutine_that_suspends() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        run_blocking(suspends())


# --- the broker's metrics against the ledgers ----------------------------------------------

SEEN = {
    "accepted": 10,
    "broker:completed:": 6,
    "broker:error:CHAOS:Raised": 1,
    "broker:cancelled:Canceled": 1,
    "broker:unseen": 2,  # their sessions ended before their events arrived
}


def test_a_scrape_that_equals_the_ledgers_passes() -> None:
    # The two unseen tasks: one cancelled with its session, one completed in flight.
    scraped = {
        ("completed", ""): 7,
        ("error", "CHAOS:Raised"): 1,
        ("cancelled", "Canceled"): 1,
        ("cancelled", "SessionClosed"): 1,
    }
    assert scrape_violations(SEEN, scraped) == []


@pytest.mark.parametrize(
    ("scraped", "symptom"),
    [
        (  # a task counted twice
            {
                ("completed", ""): 8,
                ("error", "CHAOS:Raised"): 1,
                ("cancelled", "Canceled"): 1,
                ("cancelled", "SessionClosed"): 1,
            },
            "count 11 ended tasks, the ledgers accepted 10",
        ),
        (  # one lost
            {("completed", ""): 6, ("error", "CHAOS:Raised"): 1, ("cancelled", "Canceled"): 1},
            "count 8 ended tasks, the ledgers accepted 10",
        ),
        (  # counted under the wrong outcome
            {("completed", ""): 5, ("error", "CHAOS:Raised"): 4, ("cancelled", "Canceled"): 1},
            "fewer outcomes than clients received: {('completed', ''): (5, 6)}",
        ),
    ],
)
def test_a_scrape_that_disagrees_is_a_violation(scraped, symptom) -> None:
    problems = scrape_violations(SEEN, scraped)
    assert any(symptom in p for p in problems), problems


# --- shared executions, progress, and what the harness checks across sessions ----------------


def shared_task(ledger: Ledger, page: PageRec, codeunit: int = CHAOS_SHARED) -> TaskRec:
    params = {"mode": "progress", "key": "1", "ms": "15", "steps": "6"}
    rec = TaskRec(
        "s",
        "progress",
        page,
        page.gen,
        page.page.record_id,
        params,
        "Error",
        False,
        False,
        codeunit=codeunit,
    )
    ledger.accepted(rec, FakeHandle(ledger.register(rec)), at=0.0)
    return rec


def shared_results(rec: TaskRec, *, run: str = "r1", user: str = "", **extra: str) -> dict:
    results = dict(rec.params)
    results.update(
        ctx_task="7",
        ctx_session="0",
        ctx_record="",
        gen="0",
        run=run,
        pid="99",
        version="3",
        user=user,
        began="10.0",
        ended="10.2",
    )
    results.update(extra)
    return results


def test_a_shared_execution_reports_itself_not_the_page() -> None:
    ledger, page = make_ledger()
    ledger.user = "u1"
    plain = shared_task(ledger, page)
    complete(ledger, plain, shared_results(plain))
    mine = shared_task(ledger, page, CHAOS_PER_CONTEXT)
    complete(ledger, mine, shared_results(mine, user="u1"))
    assert verified(ledger) == []
    assert ledger.counts[counted(CHAOS_SHARED, "accepted")] == 1


@pytest.mark.parametrize(
    ("codeunit", "change", "symptom"),
    [
        (CHAOS_SHARED, {"user": "u1"}, "context user 'u1', expected ''"),  # not per_context
        (CHAOS_PER_CONTEXT, {"user": "u2"}, "context user 'u2', expected 'u1'"),
        (CHAOS_SHARED, {"key": "2"}, "parameter key = '2'"),
        (CHAOS_SHARED, {"ctx_session": "42"}, "not run as a shared execution"),
        (CHAOS_SHARED, {"extra": "x"}, "fields"),
    ],
)
def test_shared_results_that_are_not_the_tasks_are_caught(codeunit, change, symptom) -> None:
    ledger, page = make_ledger()
    ledger.user = "u1"
    rec = shared_task(ledger, page, codeunit)
    complete(
        ledger,
        rec,
        shared_results(
            rec, **{"user": ledger.user if codeunit == CHAOS_PER_CONTEXT else "", **change}
        ),
    )
    assert any(symptom in v for v in verified(ledger)), ledger.violations


def progress_rec(value: dict, **state: object) -> ProgressRec:
    fields: dict = dict(
        handle_known=True,
        handle_done=False,
        triggered=False,
        cancelled=False,
        gen=0,
        settled_gen=0,
        closing=False,
        closed=False,
    )
    fields.update(state)
    return ProgressRec(value, **fields)


def progress_task(ledger: Ledger, page: PageRec) -> TaskRec:
    rec = enqueue(ledger, page, mode="progress")
    return rec


def test_progress_as_promised_has_no_violation() -> None:
    ledger, page = make_ledger()
    rec = progress_task(ledger, page)
    ledger.on_frame({"op": "progress", "task": rec.task_id, "page": page.id, "progress": {}})
    rec.handle.resolved = False
    ledger.on_progress(page, rec.task_id, {"token": rec.token, "step": "2", "of": "5"})
    ledger.on_progress(page, rec.task_id, {"token": rec.token, "step": "4", "of": "5"})
    rec.handle.resolved = True
    rec.iterated.append(IterRec([({"token": rec.token, "step": "3"}, False)], ended=True))
    complete(ledger, rec)
    assert verified(ledger) == []
    assert ledger.counts["progress:callbacks"] == 2


@pytest.mark.parametrize(
    ("state", "symptom"),
    [
        ({"handle_done": True}, "after the outcome was on the handle"),
        ({"handle_known": False}, "before the enqueue call returned"),
        ({"triggered": True}, "after the task's trigger"),
        ({"cancelled": True}, "after cancel() returned True"),
        ({"gen": 1}, "after the page moved on"),
        ({"closing": True}, "after the page moved on"),
    ],
)
def test_progress_when_it_must_not_come_is_caught(state, symptom) -> None:
    ledger, page = make_ledger()
    rec = progress_task(ledger, page)
    rec.progress.append(progress_rec({"token": rec.token, "step": "1"}, **state))
    complete(ledger, rec)
    assert any(symptom in v for v in verified(ledger)), ledger.violations


def test_progress_in_the_blocking_flavour_is_judged_by_what_returned() -> None:
    ledger, page = make_ledger(strict=False)
    rec = progress_task(ledger, page)
    # Racing the reader thread is allowed; a record change that had returned is not.
    rec.progress.append(progress_rec({"token": rec.token, "step": "1"}, handle_done=True, gen=1))
    rec.progress.append(progress_rec({"token": rec.token, "step": "2"}, settled_gen=1))
    complete(ledger, rec)
    violations = verified(ledger)
    assert len(violations) == 1
    assert "after the page moved on" in violations[0]


@pytest.mark.parametrize(
    ("values", "symptom"),
    [
        ([{"token": "other", "step": "1"}], "is not this task's"),
        ([{"token": "t1", "step": "3"}, {"token": "t1", "step": "2"}], "went backwards"),
    ],
)
def test_progress_of_another_task_or_going_backwards_is_caught(values, symptom) -> None:
    ledger, page = make_ledger()
    rec = progress_task(ledger, page)
    rec.progress += [progress_rec(value) for value in values]
    complete(ledger, rec)
    assert any(symptom in v for v in verified(ledger)), ledger.violations


def test_progress_from_a_mode_that_reports_none_is_caught() -> None:
    ledger, page = make_ledger()
    rec = enqueue(ledger, page, mode="fast")
    ledger.on_progress(page, rec.task_id, {"token": rec.token, "step": "1"})
    complete(ledger, rec)
    assert any("from mode fast" in v for v in verified(ledger))


def test_a_progress_event_after_the_outcome_or_for_a_stranger_is_caught() -> None:
    ledger, page = make_ledger()
    rec = progress_task(ledger, page)
    complete(ledger, rec)
    ledger.on_frame({"op": "progress", "task": rec.task_id, "page": page.id, "progress": {}})
    ledger.on_frame({"op": "progress", "task": 99, "page": page.id, "progress": {}})
    violations = verified(ledger)
    assert any("sent progress after the outcome event" in v for v in violations)
    assert any("progress events for task 99, never ours" in v for v in violations)


def test_a_progress_iteration_that_never_ends_or_yields_late_is_caught() -> None:
    ledger, page = make_ledger()
    rec = progress_task(ledger, page)
    rec.iterated.append(IterRec([({"token": rec.token, "step": "1"}, True)], ended=False))
    complete(ledger, rec)
    violations = verified(ledger)
    assert any("did not end after the outcome" in v for v in violations)
    assert any("yielded after the outcome arrived" in v for v in violations)


def test_a_shared_tasks_progress_must_come_from_its_execution() -> None:
    ledger, page = make_ledger()
    rec = shared_task(ledger, page)
    rec.progress.append(progress_rec({"run": "r2", "step": "1"}))
    complete(ledger, rec, shared_results(rec, run="r1"))
    assert any("is not from its execution" in v for v in verified(ledger))


def record(**fields: object) -> dict:
    """A shared task's record as a ledger hands it to the harness (completed, run r1)."""
    base: dict = {
        "cu": CHAOS_CACHED,
        "key": "1004/fast/1",
        "mode": "fast",
        "te": 1.0,
        "ts": 2.0,
        "kind": "completed",
        "code": "",
        "text": "",
        "where": "task",
        "results": {"run": "r1", "version": "1", "began": "1.5", "ended": "1.6", "gen": "0"},
    }
    base.update(fields)
    return base


def cross(records: list[dict], writes: tuple[Write, ...] = (), reloads=(), latest=None):
    return cross_violations(records, list(writes), list(reloads), latest or {})


def test_attached_and_cached_tasks_that_agree_pass() -> None:
    later = record(te=5.0, ts=5.1, where="later")  # served from the cache: no write since
    problems, counts = cross([record(), record(te=1.2), later], (Write(0.5, 0.6, 1),))
    assert problems == []
    assert counts["shared:runs"] == 1
    assert counts["shared:attached"] == 2
    assert counts["cache:served"] == 1


def test_tasks_of_one_run_with_other_results_are_caught() -> None:
    other = record()
    other["results"] = dict(other["results"], version="2")
    problems, _ = cross([record(), other], (Write(0.5, 0.6, 1), Write(0.7, 0.8, 2)))
    assert any("got different results" in p for p in problems)


def test_a_cached_result_served_after_a_write_is_caught() -> None:
    writes = (Write(0.5, 0.6, 1), Write(3.0, 3.1, 2))  # the second after the run began
    problems, _ = cross([record(), record(te=5.0, where="stale")], writes)
    assert len(problems) == 1
    assert "stale was served shared run r1's cached results, but the data changed" in problems[0]


def test_only_the_cached_codeunit_may_serve_a_run_that_had_ended() -> None:
    late = record(cu=CHAOS_SHARED, te=5.0, where="late")
    problems, _ = cross([record(cu=CHAOS_SHARED), late], (Write(0.5, 0.6, 1),))
    assert any("late (codeunit 1002, not cached)" in p for p in problems)


def test_a_snapshot_without_a_committed_write_is_caught() -> None:
    problems, _ = cross([record()], (Write(0.5, 0.6, 1), Write(1.0, 1.1, 2)))
    assert any("read data version 1, but version 2 was committed" in p for p in problems)


def test_a_task_enqueued_after_a_reload_on_the_old_code_is_caught() -> None:
    latest = {"0": (6.0, "the late one"), "1": (9.0, "fine")}
    problems, _ = cross([], reloads=[Reload(1, 5.0), Reload(2, None)], latest=latest)
    assert len(problems) == 1
    assert "1.000 s after the reload to code generation 1" in problems[0]
    assert "the late one" in problems[0]


def test_a_shared_executions_unexpected_end_counts_once() -> None:
    crash = {"kind": "error", "code": "ChildSessionCrashed", "text": "worker 12 died"}
    timeout = {"kind": "error", "code": "ChildSessionTaskTimeout", "text": "timed out"}
    records = [
        record(**crash, results=None),
        record(**crash, results=None),  # the same worker: one crash
        record(**crash, results=None, mode="exit"),  # expected of its mode
        record(**timeout, results=None, ts=10.0),
        record(**timeout, results=None, ts=10.2),  # the same execution
        record(**timeout, results=None, ts=14.0),  # the next one
    ]
    _, counts = cross(records)
    assert counts["unexpected_crash"] == 1
    assert counts["unexpected_timeout"] == 2


def test_the_scrape_is_compared_per_codeunit() -> None:
    counts = {counted(CHAOS_SHARED, "accepted"): 2, counted(CHAOS_SHARED, "broker:completed:"): 2}
    assert of_codeunit(counts, CHAOS_SHARED) == {"accepted": 2, "broker:completed:": 2}
    assert scrape_violations(of_codeunit(counts, CHAOS_SHARED), {("completed", ""): 2}) == []
    assert scrape_violations(of_codeunit(counts, CHAOS_SHARED), {("completed", ""): 3})


def test_a_shutdown_event_during_a_session_is_a_violation() -> None:
    ledger, page = make_ledger()
    complete(ledger, enqueue(ledger, page))
    ledger.on_frame({"op": "shutdown", "code": "ServerShuttingDown", "text": "stopping"})
    assert any("the broker said it is shutting down: 'stopping'" in v for v in verified(ledger))
