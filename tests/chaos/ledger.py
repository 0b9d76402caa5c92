"""What one chaos session saw, and the promises it checks when the session ends.

Pure bookkeeping: no sockets, no processes. The episode driver (``episodes.py``) feeds a
:class:`Ledger` with what happens (tasks accepted, raw broker frames from the client's tap,
trigger calls, notifications, the handles' outcomes) and calls :meth:`Ledger.verify` at the
end; every broken promise becomes one violation line that names the seed, client, episode,
session, page and task, and what was seen.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any, Final

from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    CancelReason,
    ChildSessionCode,
    ConnectionLost,
    PbtError,
)
from tests.chaos_codeunits import RAISED_CODE

# How each mode of the Chaos codeunit may end (tests/chaos_codeunits.py).
COMPLETING: Final = frozenset({"fast", "sleep", "spawn", "escape_done"})
TIMING_OUT: Final = frozenset({"spin", "spawn_spin", "escape"})
CRASHING: Final = frozenset({"exit", "spawn_exit"})
OUTCOME_OPS: Final = ("completed", "failed", "cancelled")
# The broker's outcome event -> the outcome label of its pbt_tasks_total metric.
METRIC_OUTCOME: Final = {"completed": "completed", "failed": "error", "cancelled": "cancelled"}
UNSEEN: Final = "broker:unseen"  # counts key: accepted tasks whose event never arrived

Outcome = tuple[str, str, str, "dict[str, str] | None"]  # kind, code, text, results


def classify(error: BaseException | None, results: dict[str, str] | None) -> Outcome:
    """A handle's outcome as (kind, code, text, results); kind is completed / error /
    cancelled / lost (ConnectionLost) / other."""
    if error is None:
        return ("completed", "", "", results)
    if isinstance(error, BackgroundTaskCanceled):
        return ("cancelled", error.code, error.text, None)
    if isinstance(error, BackgroundTaskError):
        return ("error", error.code, error.text, None)
    if isinstance(error, ConnectionLost):
        return ("lost", error.code, error.text, None)
    code = error.code if isinstance(error, PbtError) else type(error).__name__
    return ("other", code, str(error), None)


@dataclasses.dataclass(eq=False)
class PageRec:
    page: Any  # blocking.Page | aio.Page (anything with ``id`` and ``record_id``)
    seq: int
    gen: int = 0  # set_record calls begun
    settled_gen: int = 0  # set_record calls returned
    closing: bool = False  # close() begun
    closed: bool = False  # close() returned

    @property
    def id(self) -> int:
        page_id: int = self.page.id
        return page_id


@dataclasses.dataclass(eq=False)
class TaskRec:
    token: str
    mode: str
    page: PageRec
    gen: int  # the page's gen at enqueue
    record: str
    params: dict[str, str]
    level: str
    handled: bool  # what on_error returns for it
    raise_in_trigger: bool
    handle: Any = None  # the client's BackgroundTask
    task_id: int = 0
    enqueued_at: float = 0.0
    cancel_result: bool | None = None
    first: Outcome | None = None  # the outcome first seen on the handle
    # Reading the handle decides the task: if it was read before its page moved on, its
    # trigger is bound to run, afterwards too (one decision per task).
    decided_on_record: bool = False
    final: Outcome | None = None  # the handle's outcome when the session ended
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TriggerRec:
    """One trigger call, with the page's state when it ran."""

    kind: str  # "completed" | "error"
    page_seq: int
    gen: int
    settled_gen: int
    closing: bool
    closed: bool
    handle_done: bool | None  # None: the task was not in the ledger yet
    payload: object  # the results, or the error code
    returned: bool  # on_error's is_handled; for on_completed: whether it raised


def expected_results(rec: TaskRec, session_id: int) -> dict[str, str]:
    """What the Chaos codeunit returns for ``rec``: its parameters and the broker's ids."""
    results = dict(rec.params)
    results["ctx_task"] = str(rec.task_id)
    results["ctx_session"] = str(session_id)
    results["ctx_record"] = rec.record
    return results


class Ledger:
    """One session's life as the client saw it.

    ``strict``: local state changes are atomic with what the client library does (one
    thread, the asyncio flavour). The blocking flavour's reader thread races them, so the
    checks that need that are relaxed there (an outcome may still arrive between our
    snapshot and a ``set_record`` call).
    """

    def __init__(self, *, seed: int, client: int, seq: int, strict: bool) -> None:
        self.seed = seed
        self.client = client
        self.seq = seq
        self.strict = strict
        self.session_id = 0
        self.tasks: list[TaskRec] = []
        self.by_id: dict[int, TaskRec] = {}
        # Written by the client's reader (raw) and dispatcher (triggers, notifications).
        self.raw: dict[int, list[tuple[str, str, object]]] = collections.defaultdict(list)
        self.unknown_events: list[tuple[str, object]] = []
        self.triggers: dict[int, list[TriggerRec]] = collections.defaultdict(list)
        self.notifications: list[tuple[int, str, str, int]] = []
        self.ended = ""  # natural / close / abort / stalled / broken
        self.last_task_id = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []

    # --- recording ---------------------------------------------------------------------

    def violation(self, text: str, rec: TaskRec | None = None) -> None:
        where = self.describe(rec) if rec else f"[{self.identity()}]"
        self.violations.append(f"{text}: {where}")

    def identity(self) -> str:
        return f"seed {self.seed} client {self.client} episode {self.seq} session {self.session_id}"

    def describe(self, rec: TaskRec) -> str:
        raw = self.raw.get(rec.task_id, [])
        triggers = self.triggers.get(rec.task_id, [])
        first = rec.first and rec.first[:3]
        final = rec.final and rec.final[:3]
        return (
            f"[{self.identity()} page {rec.page.id} task {rec.task_id} token {rec.token} "
            f"mode {rec.mode} record {rec.record!r}] first outcome {first}, final {final}, "
            f"broker events {raw}, triggers {[(t.kind, t.page_seq, t.gen) for t in triggers]}, "
            f"notes {rec.notes}, episode ended {self.ended!r}"
        )

    def on_frame(self, message: Mapping[str, Any]) -> None:
        """Every broker frame, before the client library applies it (the core's tap)."""
        op = message.get("op")
        if op in OUTCOME_OPS:
            task = message.get("task")
            if type(task) is int:
                self.raw[task].append((str(op), str(message.get("code", "")), message.get("page")))
            else:
                self.unknown_events.append((str(op), task))

    def register(self, rec: TaskRec) -> int:
        """Put ``rec`` under the id it will get: its outcome may come before enqueue returns."""
        expected = self.last_task_id + 1
        self.by_id[expected] = rec
        return expected

    def refused(self, expected_id: int, code: str, text: str) -> None:
        del self.by_id[expected_id]
        self.counts["refused"] += 1
        self.counts[f"refused:{code}"] += 1
        if code != "ChildSessionQueueFull":
            self.violation(f"enqueue refused: {code}: {text}")

    def accepted(self, rec: TaskRec, handle: Any, at: float) -> None:
        rec.handle = handle
        rec.task_id = handle.id
        rec.enqueued_at = at
        if handle.id != self.last_task_id + 1:
            self.violation(f"task id {handle.id} after {self.last_task_id}: ids must be 1, 2, ...")
            self.by_id.pop(self.last_task_id + 1, None)
        self.last_task_id = max(self.last_task_id, handle.id)
        self.by_id[handle.id] = rec
        self.tasks.append(rec)
        self.counts["accepted"] += 1
        self.counts[f"mode:{rec.mode}"] += 1

    def trigger_completed(self, page: PageRec, task_id: int, results: dict[str, str]) -> None:
        rec = self.by_id.get(task_id)
        raised = rec is not None and rec.raise_in_trigger
        self.triggers[task_id].append(self._trigger("completed", page, rec, dict(results), raised))
        if raised:
            raise RuntimeError(f"trigger raised for task {task_id}")

    def trigger_error(self, page: PageRec, task_id: int, code: str, text: str, stack: str) -> bool:
        rec = self.by_id.get(task_id)
        handled = True if rec is None else rec.handled
        self.triggers[task_id].append(self._trigger("error", page, rec, code, handled))
        return handled

    @staticmethod
    def _trigger(
        kind: str, page: PageRec, rec: TaskRec | None, payload: object, returned: bool
    ) -> TriggerRec:
        done = rec.handle.done() if rec is not None and rec.handle is not None else None
        return TriggerRec(
            kind,
            page.seq,
            page.gen,
            page.settled_gen,
            page.closing,
            page.closed,
            done,
            payload,
            returned,
        )

    def notification(self, note: Any) -> None:
        self.notifications.append((note.task_id, str(note.severity.value), note.code, note.page_id))

    def observe(self, rec: TaskRec, outcome: Outcome) -> bool:
        """The handle has ``outcome``; True if that is news (the first outcome seen)."""
        if rec.first is None:
            rec.first = outcome
            rec.decided_on_record = rec.page.gen == rec.gen and not rec.page.closing
            return True
        return False

    def cancelled(self, rec: TaskRec, result: bool, at: float) -> None:
        """``cancel()`` returned ``result``; the handle must be resolved by now."""
        rec.cancel_result = result
        rec.notes.append(f"cancel()={result} at {at:.3f}")
        self.counts["cancel_calls"] += 1
        self.counts["cancel_true"] += result
        if rec.first is None:
            self.violation(f"not resolved when cancel() returned {result}", rec)
        elif result and rec.first[:2] != ("cancelled", CancelReason.CANCELED):
            self.violation("cancel() returned True, the handle says otherwise", rec)

    def expect_done(self, recs: list[TaskRec], after: str, codes: set[str]) -> None:
        """``after`` returned: every rec must be resolved, cancelled with one of ``codes``."""
        for rec in recs:
            if rec.first is None:
                self.violation(f"not resolved when {after} returned", rec)
                continue
            kind, code = rec.first[:2]
            ok = (kind == "cancelled" and code in codes) or (kind == "lost" and "lost" in codes)
            if not ok and not (not self.strict and kind in ("completed", "error")):
                self.violation(f"after {after} expected cancelled {sorted(codes)}", rec)

    def stalled(self, pending: list[TaskRec], seconds: float, status: object) -> None:
        for rec in pending:
            self.violation(
                f"no outcome after {seconds:.0f} s without progress (broker status {status})", rec
            )
        self.ended = "stalled"

    def due(self) -> int:
        """Triggers and notifications that should still come (for a session ending naturally)."""
        count = 0
        expected_notes = 0
        for rec in self.tasks:
            if rec.first is None or rec.first[0] not in ("completed", "error"):
                continue
            triggers = self.triggers.get(rec.task_id)
            if not triggers:
                count += rec.page.gen == rec.gen and not rec.page.closing
                continue
            trigger = triggers[0]
            if trigger.kind == "completed":
                expected_notes += trigger.returned
            else:
                expected_notes += not trigger.returned and rec.level != "Ignore"
        return count + max(0, expected_notes - len(self.notifications))

    # --- the end of the session --------------------------------------------------------------

    def verify(self) -> None:
        """Check every task and everything the client saw; fills violations and counts."""
        counts = self.counts
        counts["sessions"] += 1
        counts[f"ended:{self.ended}"] += 1
        expected_notes: collections.Counter[tuple[int, str, str]] = collections.Counter()
        for rec in self.tasks:
            note = self._verify_task(rec)
            if note is not None:
                expected_notes[note] += 1
        accepted = set(self.by_id)
        for task_id in set(self.raw) - accepted:
            self.violation(f"broker events {self.raw[task_id]} for task {task_id}, never ours")
        for task_id in set(self.triggers) - accepted:
            self.violation(f"trigger {self.triggers[task_id]} for task {task_id}, never ours")
        for event in self.unknown_events:
            self.violation(f"outcome event without a task id: {event}")
        seen_notes = collections.Counter((t, sev, code) for t, sev, code, _ in self.notifications)
        for key, n in (seen_notes - expected_notes).items():
            self.violation(f"unexpected notification (task, severity, code) {key} x{n}")
        if self.ended == "natural":
            for key, n in (expected_notes - seen_notes).items():
                self.violation(f"missing notification (task, severity, code) {key} x{n}")
        for task_id, severity, code, page_id in self.notifications:
            owner = self.by_id.get(task_id)
            if owner is not None and owner.page.id != page_id:
                self.violation(f"notification {severity} {code} for page {page_id}", owner)
            counts[f"notification:{severity}"] += 1

    def _verify_task(self, rec: TaskRec) -> tuple[int, str, str] | None:
        counts = self.counts
        out = rec.final
        if out is None or rec.first is None:
            self.violation("no outcome (lost task)", rec)
            return None
        if out != rec.first:
            self.violation("the handle's outcome changed", rec)
        kind, code, text, results = out
        counts[f"outcome:{kind}"] += 1
        if kind == "error":
            counts[f"error:{code}"] += 1
        elif kind == "cancelled":
            counts[f"cancelled:{code}"] += 1
        self._verify_events(rec, kind, code)
        # The mode decides how a task may end; our own actions decide how it may be cancelled.
        if kind == "completed":
            if rec.mode not in COMPLETING:
                self.violation(f"mode {rec.mode} completed", rec)
            elif results != expected_results(rec, self.session_id):
                self.violation(f"results {results!r:.300} are not this task's identity", rec)
        elif kind == "error":
            if code == RAISED_CODE:
                if rec.mode != "raise" or f"{rec.token} (task {rec.task_id})" not in text:
                    self.violation(f"error text {text!r} is not this task's", rec)
            elif code == ChildSessionCode.TASK_TIMEOUT:
                if rec.mode not in TIMING_OUT:
                    counts["unexpected_timeout"] += 1
            elif code == ChildSessionCode.CRASHED:
                if rec.mode not in CRASHING:
                    counts["unexpected_crash"] += 1
            else:
                self.violation(f"unexpected error code {code}: {text:.200}", rec)
        elif kind == "cancelled":
            allowed: dict[str, bool] = {
                CancelReason.CANCELED: rec.cancel_result is True,
                CancelReason.RECORD_CHANGED: rec.page.gen != rec.gen,
                CancelReason.PAGE_CLOSED: rec.page.closing,
                CancelReason.SESSION_CLOSED: self.ended in ("close", "stalled", "broken"),
            }
            if not allowed.get(code, False):
                self.violation(f"cancelled with {code}, which nothing asked for", rec)
        elif kind == "lost":
            if self.ended not in ("abort", "broken"):
                self.violation("ConnectionLost on a connection nobody broke", rec)
        else:
            self.violation(f"unexpected outcome {code}: {text:.200}", rec)
        if rec.cancel_result is True and (kind, code) != ("cancelled", CancelReason.CANCELED):
            self.violation("cancel() returned True but the task was not cancelled by id", rec)
        return self._verify_triggers(rec, out)

    def _verify_events(self, rec: TaskRec, kind: str, code: str) -> None:
        """At most one outcome event per task, on its own page, and matching the handle."""
        raw = self.raw.get(rec.task_id, [])
        # What the broker said, for the comparison with its metrics (scrape_violations).
        if raw:
            self.counts[f"broker:{METRIC_OUTCOME[raw[0][0]]}:{raw[0][1]}"] += 1
        else:
            self.counts[UNSEEN] += 1
        if len(raw) > 1:
            self.violation(f"the broker sent {len(raw)} outcome events", rec)
        for _op, _code, page_id in raw:
            if page_id != rec.page.id:
                self.violation(f"outcome event for page {page_id}", rec)
        resolved_locally = kind == "lost" or (
            kind == "cancelled" and code == CancelReason.SESSION_CLOSED
        )
        if resolved_locally:
            # An outcome that arrived but was not yet decided ends with the session too.
            if raw and self.strict and raw[0][0] not in ("completed", "failed"):
                self.violation("a broker event arrived, yet the task ended locally", rec)
            return
        if len(raw) != 1:
            self.violation(f"{kind} {code} without exactly one broker event", rec)
            return
        op, raw_code = raw[0][:2]
        # An outcome that arrived is decided cancelled if its page moves on, or it is
        # cancelled by id, before anything read it: no trigger, and the handle says so.
        locally_cancelled = kind == "cancelled" and (
            code in (CancelReason.RECORD_CHANGED, CancelReason.PAGE_CLOSED)
            or (code == CancelReason.CANCELED and rec.cancel_result is True)
        )
        consistent = (
            (kind == "completed" and op == "completed")
            or (kind == "error" and op == "failed" and raw_code == code)
            or (kind == "cancelled" and op == "cancelled" and raw_code == code)
            or (locally_cancelled and op in ("completed", "failed"))
        )
        if not consistent:
            self.violation(f"broker event {raw[0]} does not match the outcome", rec)

    def _verify_triggers(self, rec: TaskRec, out: Outcome) -> tuple[int, str, str] | None:
        """Check the task's trigger; return the notification it should have caused, if any."""
        kind, code, _text, results = out
        triggers = self.triggers.get(rec.task_id, [])
        if len(triggers) > 1:
            self.violation(f"{len(triggers)} triggers ran", rec)
        if not triggers:
            page = rec.page
            untouched = (page.gen == rec.gen and not page.closing) or rec.decided_on_record
            if kind in ("completed", "error") and untouched and self.ended == "natural":
                self.violation("no trigger ran for a completed / failed task", rec)
            return None
        trigger = triggers[0]
        self.counts[f"trigger:{trigger.kind}"] += 1
        if kind not in ("completed", "error"):
            self.violation(f"a {trigger.kind} trigger ran for a task that ended {kind} {code}", rec)
            return None
        if trigger.kind != kind:
            self.violation(f"a {trigger.kind} trigger ran for a task that ended {kind}", rec)
        if trigger.page_seq != rec.page.seq:
            self.violation(f"the trigger ran on page #{trigger.page_seq}", rec)
        if trigger.handle_done is False:
            self.violation("the trigger ran before the handle was resolved", rec)
        if self.strict:
            moved = trigger.gen != rec.gen or trigger.closing
        else:
            moved = trigger.settled_gen != rec.gen or trigger.closed
        if moved and not rec.decided_on_record:
            self.violation("a trigger ran after the page moved to another record / closed", rec)
        if trigger.kind == "completed":
            if trigger.payload != results:
                self.violation("the trigger got other results than the handle", rec)
            return (rec.task_id, "Error", "RuntimeError") if trigger.returned else None
        if trigger.payload != code:
            self.violation(f"the error trigger got code {trigger.payload}", rec)
        if not trigger.returned and rec.level != "Ignore":
            return (rec.task_id, rec.level, code)
        return None


def scrape_violations(
    counts: Mapping[str, int], scraped: Mapping[tuple[str, str], int]
) -> list[str]:
    """Compare the broker's ``pbt_tasks_total`` for the ledger clients' codeunit, by (outcome,
    code), with what the ledgers saw (``counts``, summed over every session).

    Every accepted task ends exactly once in the broker, so the scrape's total is exactly
    the tasks accepted. Each (outcome, code) must be counted at least as often as its event
    reached a client; the rest are exactly the tasks whose session ended before their event
    arrived (closed or broken on purpose: the client resolved them itself).
    """
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for key, n in counts.items():
        if key.startswith("broker:") and key != UNSEEN:
            _, outcome, code = key.split(":", 2)
            seen[outcome, code] += n
    accepted, unseen = counts.get("accepted", 0), counts.get(UNSEEN, 0)
    problems = []
    total = sum(scraped.values())
    if total != accepted:
        problems.append(
            f"the broker's metrics count {total} ended tasks, the ledgers accepted {accepted}"
            f" (scrape {dict(scraped)})"
        )
    short = {key: (scraped.get(key, 0), n) for key, n in seen.items() if scraped.get(key, 0) < n}
    if short:
        problems.append(f"the metrics count fewer outcomes than clients received: {short}")
    excess = sum(n - seen[key] for key, n in scraped.items() if n > seen[key])
    if not short and excess != unseen:
        problems.append(
            f"the metrics count {excess} outcomes no client received, but {unseen} tasks"
            " ended without their event"
        )
    return problems
