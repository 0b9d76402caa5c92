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
    Ledger,
    PageRec,
    TaskRec,
    classify,
    expected_results,
    scrape_violations,
)


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
