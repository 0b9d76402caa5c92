"""What one chaos session saw, and the promises it checks when the session ends.

Pure bookkeeping: no sockets, no processes. The episode driver (``episodes.py``) feeds a
:class:`Ledger` with what happens (tasks accepted, raw broker frames from the client's tap,
trigger calls, notifications, the handles' outcomes) and calls :meth:`Ledger.verify` at the
end; every broken promise becomes one violation line that names the seed, client, episode,
session, page and task, and what was seen.

What one session cannot see — that the pages of many sessions attached to one shared
execution got the same outcome, that a cached result was served only while the data had not
changed, that a task enqueued after a reload ran the new code — each ledger hands over as
records (:meth:`Ledger.shared_records`, :attr:`Ledger.latest_gen`), and the harness checks
them together with its own log of writes and reloads (:func:`cross_violations`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    CancelReason,
    ChildSessionCode,
    ConnectionLost,
    PbtError,
)
from tests.chaos_codeunits import (
    CHAOS,
    CHAOS_CACHED,
    CHAOS_PER_CONTEXT,
    RAISED_CODE,
    SHARED_CODEUNITS,
)

# How each mode of the Chaos codeunits may end (tests/chaos_codeunits.py).
COMPLETING: Final = frozenset({"fast", "sleep", "spawn", "escape_done", "progress"})
TIMING_OUT: Final = frozenset({"spin", "spawn_spin", "escape"})
CRASHING: Final = frozenset({"exit", "spawn_exit"})
OUTCOME_OPS: Final = ("completed", "failed", "cancelled")
# The broker's outcome event -> the outcome label of its pbt_tasks_total metric.
METRIC_OUTCOME: Final = {"completed": "completed", "failed": "error", "cancelled": "cancelled"}
UNSEEN: Final = "broker:unseen"  # counts key: accepted tasks whose event never arrived
# What a shared execution returns besides the parameters (tests/chaos_codeunits.py).
SHARED_RESULT_KEYS: Final = frozenset(
    {"ctx_task", "ctx_session", "ctx_record", "gen", "run", "pid", "version", "user"}
    | {"began", "ended"}
)
SHARED_RAISED: Final = "raised by shared run "
# Two outcomes of one key's shared executions are at least a timeout apart (the next
# execution starts after the previous one ended); those of one execution reach the
# sessions within this of each other.
SAME_EXECUTION_GAP: Final = 1.0

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


def counted(codeunit: int, key: str) -> str:
    """The counts key of ``key`` for one codeunit's tasks (the scrape is checked per codeunit)."""
    return f"cu{codeunit}|{key}"


def of_codeunit(counts: Mapping[str, int], codeunit: int) -> dict[str, int]:
    """The counts of one codeunit's tasks, under the keys :func:`scrape_violations` reads."""
    prefix = f"cu{codeunit}|"
    return {k[len(prefix) :]: n for k, n in counts.items() if k.startswith(prefix)}


@dataclasses.dataclass(eq=False)
class PageRec:
    page: Any  # blocking.Page | aio.Page (anything with ``id`` and ``record_id``)
    seq: int
    gen: int = 0  # set_record calls begun
    settled_gen: int = 0  # set_record calls returned
    closing: bool = False  # close() begun
    closed: bool = False  # close() returned
    watches_progress: bool = True  # has on_progress

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
    codeunit: int = CHAOS
    t_enqueue: float = 0.0  # time.monotonic() just before the enqueue call
    t_seen: float | None = None  # when its outcome event was read (the tap)
    progress: list[ProgressRec] = dataclasses.field(default_factory=list)  # on_progress calls
    iterated: list[IterRec] = dataclasses.field(default_factory=list)  # progress_updates()

    @property
    def shared(self) -> bool:
        return self.codeunit in SHARED_CODEUNITS


@dataclasses.dataclass(frozen=True)
class ProgressRec:
    """One ``on_progress`` call, with the task's and its page's state when it ran."""

    value: dict[str, str]
    handle_known: bool  # the enqueue call had returned the handle
    handle_done: bool  # the outcome was on the handle already
    triggered: bool  # the task's trigger had run already
    cancelled: bool  # cancel() had returned True
    gen: int
    settled_gen: int
    closing: bool
    closed: bool


@dataclasses.dataclass(eq=False)
class IterRec:
    """One ``progress_updates()`` iteration (asyncio flavour): what it yielded, and how the
    handle stood at each yield."""

    values: list[tuple[dict[str, str], bool]] = dataclasses.field(default_factory=list)
    ended: bool = False
    error: str = ""


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


def expected_results(rec: TaskRec, session_id: int, gen: str = "0") -> dict[str, str]:
    """What the Chaos codeunit returns for ``rec``: its parameters and the broker's ids (and
    the generation of the code that ran it)."""
    results = dict(rec.params)
    results["ctx_task"] = str(rec.task_id)
    results["ctx_session"] = str(session_id)
    results["ctx_record"] = rec.record
    results["gen"] = gen
    return results


def shared_result_problem(rec: TaskRec, results: Mapping[str, str], user: str) -> str:
    """What is wrong with a shared execution's ``results`` for ``rec`` ("" if nothing): its
    parameters, the execution's own ids (the shared session 0, no record), a context only
    for ``per_context``, and the fields that identify the execution."""
    if set(results) != set(rec.params) | SHARED_RESULT_KEYS:
        return f"fields {sorted(results)}"
    for key, value in rec.params.items():
        if results[key] != value:
            return f"parameter {key} = {results[key]!r}, the task's is {value!r}"
    want_user = user if rec.codeunit == CHAOS_PER_CONTEXT else ""
    if results["user"] != want_user:
        return f"context user {results['user']!r}, expected {want_user!r}"
    if (results["ctx_session"], results["ctx_record"]) != ("0", ""):
        return "not run as a shared execution (session 0, no record)"
    try:
        int(results["ctx_task"])
        int(results["pid"])
        int(results["version"])
        float(results["began"])
        float(results["ended"])
    except ValueError:
        return "malformed execution fields"
    if not results["run"]:
        return "no run nonce"
    return ""


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
        self.user = ""  # the session's context user (what per_context executions see)
        self.tasks: list[TaskRec] = []
        self.by_id: dict[int, TaskRec] = {}
        # Written by the client's reader (raw) and dispatcher (triggers, notifications).
        self.raw: dict[int, list[tuple[str, str, object]]] = collections.defaultdict(list)
        # Progress frames: (page, whether an outcome event for the task had come before).
        self.raw_progress: dict[int, list[tuple[object, bool]]] = collections.defaultdict(list)
        self.seen_at: dict[int, float] = {}  # when a task's first outcome event was read
        self.stray_progress: dict[int, int] = collections.Counter()  # on_progress, not ours
        self.unknown_events: list[tuple[str, object]] = []
        self.triggers: dict[int, list[TriggerRec]] = collections.defaultdict(list)
        self.notifications: list[tuple[int, str, str, int]] = []
        self.ended = ""  # natural / close / abort / stalled / broken
        self.last_task_id = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        # Code generation -> the latest enqueue (and its task) whose results came from it.
        self.latest_gen: dict[str, tuple[float, str]] = {}

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
            f"notes {rec.notes}, episode ended {self.ended!r}, codeunit {rec.codeunit}"
            + (f" params {rec.params}" if rec.shared else "")
        )

    def on_frame(self, message: Mapping[str, Any]) -> None:
        """Every broker frame, before the client library applies it (the core's tap)."""
        op = message.get("op")
        if op in OUTCOME_OPS:
            task = message.get("task")
            if type(task) is int:
                self.raw[task].append((str(op), str(message.get("code", "")), message.get("page")))
                self.seen_at.setdefault(task, time.monotonic())
            else:
                self.unknown_events.append((str(op), task))
        elif op == "progress":
            task = message.get("task")
            if type(task) is int:
                self.raw_progress[task].append((message.get("page"), task in self.raw))
            else:
                self.unknown_events.append((str(op), task))
        elif op == "shutdown":  # a ledger session ends before the broker is stopped
            self.unknown_events.append(("shutdown", message.get("text")))

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
        self.counts[counted(rec.codeunit, "accepted")] += 1
        self.counts[f"mode:{rec.mode}"] += 1
        if rec.shared:
            self.counts[f"shared:{rec.codeunit}"] += 1

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

    def on_progress(self, page: PageRec, task_id: int, progress: dict[str, str]) -> None:
        """``page.on_progress`` ran (on the client's dispatcher)."""
        rec = self.by_id.get(task_id)
        if rec is None or rec.page is not page:
            self.stray_progress[task_id] += 1
            return
        handle = rec.handle
        rec.progress.append(
            ProgressRec(
                dict(progress),
                handle_known=handle is not None,
                handle_done=handle is not None and handle.done(),
                triggered=bool(self.triggers.get(task_id)),
                cancelled=rec.cancel_result is True,
                gen=page.gen,
                settled_gen=page.settled_gen,
                closing=page.closing,
                closed=page.closed,
            )
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

    def shared_records(self) -> list[dict[str, Any]]:
        """What :func:`cross_violations` needs of each shared task (call after verify)."""
        records = []
        for rec in self.tasks:
            if not rec.shared or rec.final is None:
                continue
            kind, code, text, results = rec.final
            record: dict[str, Any] = {
                "cu": rec.codeunit,
                "key": f"{rec.codeunit}/{rec.params.get('mode')}/{rec.params.get('key')}"
                + (f"/{self.user}" if rec.codeunit == CHAOS_PER_CONTEXT else ""),
                "mode": rec.mode,
                "te": rec.t_enqueue,
                "ts": self.seen_at.get(rec.task_id),
                "kind": kind,
                "code": code,
                "text": text[:300],
                "where": f"seed {self.seed} client {self.client} episode {self.seq} session "
                f"{self.session_id} task {rec.task_id}",
            }
            if kind == "completed" and results is not None:
                record["results"] = dict(results)
            records.append(record)
        return records

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
        for task_id in set(self.raw_progress) - accepted:
            self.violation(f"progress events for task {task_id}, never ours")
        for task_id, n in self.stray_progress.items():
            self.violation(f"on_progress ran {n}x for task {task_id}, not this page's or ours")
        for event in self.unknown_events:
            if event[0] == "shutdown":
                self.violation(f"the broker said it is shutting down: {event[1]!r}")
            else:
                self.violation(f"event without a task id: {event}")
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
        if kind == "completed" and results is not None and "gen" in results:
            gen = results["gen"]
            if rec.t_enqueue >= self.latest_gen.get(gen, (-1.0, ""))[0]:
                self.latest_gen[gen] = (rec.t_enqueue, self.describe(rec))
        counts[f"outcome:{kind}"] += 1
        if kind == "error":
            counts[f"error:{code}"] += 1
        elif kind == "cancelled":
            counts[f"cancelled:{code}"] += 1
        self._verify_events(rec, kind, code)
        self._verify_progress(rec, out)
        # The mode decides how a task may end; our own actions decide how it may be cancelled.
        if kind == "completed":
            if rec.mode not in COMPLETING:
                self.violation(f"mode {rec.mode} completed", rec)
            elif rec.shared:
                assert results is not None
                problem = shared_result_problem(rec, results, self.user)
                if problem:
                    self.violation(f"results {results!r:.300} are not this task's: {problem}", rec)
            elif results != expected_results(rec, self.session_id, str((results or {}).get("gen"))):
                self.violation(f"results {results!r:.300} are not this task's identity", rec)
        elif kind == "error":
            # Shared executions' unexpected ends are counted by cross_violations, once each.
            if code == RAISED_CODE:
                if rec.shared:
                    if rec.mode != "raise" or not text.startswith(SHARED_RAISED):
                        self.violation(f"error text {text!r} is not a shared execution's", rec)
                elif rec.mode != "raise" or f"{rec.token} (task {rec.task_id})" not in text:
                    self.violation(f"error text {text!r} is not this task's", rec)
            elif code == ChildSessionCode.TASK_TIMEOUT:
                if rec.mode not in TIMING_OUT and not rec.shared:
                    counts["unexpected_timeout"] += 1
            elif code == ChildSessionCode.CRASHED:
                if rec.mode not in CRASHING and not rec.shared:
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
        said = f"broker:{METRIC_OUTCOME[raw[0][0]]}:{raw[0][1]}" if raw else UNSEEN
        self.counts[said] += 1
        self.counts[counted(rec.codeunit, said)] += 1
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

    def _verify_progress(self, rec: TaskRec, out: Outcome) -> None:
        """Progress comes only from a mode that reports it, to its own page, never after the
        outcome (not on the wire, not in on_progress, not from progress_updates()), never
        once the page moved on or the task was cancelled, never before the TaskId was known;
        and it never goes backwards. A shared task's progress is its execution's."""
        kind, _code, _text, results = out
        for page_id, after_outcome in self.raw_progress.get(rec.task_id, []):
            if after_outcome:
                self.violation("the broker sent progress after the outcome event", rec)
            if page_id != rec.page.id:
                self.violation(f"progress event for page {page_id}", rec)
        values = [p.value for p in rec.progress]
        for it in rec.iterated:
            values += [value for value, _ in it.values]
        if values and rec.mode != "progress":
            self.violation(f"progress {values[:3]} from mode {rec.mode}", rec)
            return
        self.counts["progress:callbacks"] += len(rec.progress)
        self.counts["progress:tasks"] += bool(rec.progress)
        for p in rec.progress:
            if self.strict:
                moved = p.gen != rec.gen or p.closing
                if not p.handle_known:
                    self.violation("on_progress ran before the enqueue call returned", rec)
                if p.handle_done:
                    self.violation("on_progress ran after the outcome was on the handle", rec)
            else:
                moved = p.settled_gen != rec.gen or p.closed
            if p.triggered:
                self.violation("on_progress ran after the task's trigger", rec)
            if p.cancelled:
                self.violation("on_progress ran after cancel() returned True", rec)
            if moved:
                self.violation("on_progress ran after the page moved on", rec)
        for it in rec.iterated:
            self.counts["progress:iterations"] += 1
            self.counts["progress:yielded"] += len(it.values)
            if it.error:
                self.violation(f"progress_updates() raised {it.error}", rec)
            elif not it.ended:
                self.violation("progress_updates() did not end after the outcome", rec)
            if any(done for _, done in it.values):
                self.violation("progress_updates() yielded after the outcome arrived", rec)
        if rec.progress and not rec.page.watches_progress:
            self.violation("on_progress ran on a page without one", rec)
        for series in [[p.value for p in rec.progress]] + [
            [value for value, _ in it.values] for it in rec.iterated
        ]:
            steps = [_step(value) for value in series]
            if steps != sorted(steps):
                self.violation(f"progress went backwards: steps {steps}", rec)
        for value in values:
            if rec.shared:
                run = (results or {}).get("run") if kind == "completed" else None
                if not value.get("run") or (run is not None and value["run"] != run):
                    self.violation(f"progress {value} is not from its execution (run {run})", rec)
            elif value.get("token") != rec.token:
                self.violation(f"progress {value} is not this task's", rec)

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


def _step(value: Mapping[str, str]) -> int:
    try:
        return int(value.get("step", "0"))
    except ValueError:
        return -1


@dataclasses.dataclass(frozen=True)
class Write:
    """A commit the harness made through its own connection: ``version`` from then on."""

    start: float  # time.monotonic() before BEGIN
    end: float  # after COMMIT returned
    version: int


@dataclasses.dataclass(frozen=True)
class Reload:
    """A reload to code generation ``gen``, known complete by ``done`` (None: unknown)."""

    gen: int
    done: float | None


def cross_violations(
    records: Iterable[Mapping[str, Any]],
    writes: Sequence[Write],
    reloads: Iterable[Reload],
    latest_gen: Mapping[str, tuple[float, str]],
) -> tuple[list[str], collections.Counter[str]]:
    """What no single session can check, over every ledger client's records:

    - the tasks of one shared execution (one ``run`` nonce) got the same results;
    - an execution's snapshot has every write committed before it began, none not yet made;
    - a task enqueued after its execution's outcome had reached a client was served from the
      cache (only ``cache=True`` may do that), and only while no write had changed the data
      since that execution began;
    - a task enqueued after a reload to generation g had completed ran code of g or later.

    ``writes`` are in commit order; ``latest_gen`` is, per generation, the latest enqueue
    whose results came from its code. Also returns counts: executions, attached and cached
    tasks, and the unexpected crashes and timeouts of shared executions, one per execution.
    """
    problems: list[str] = []
    counts: collections.Counter[str] = collections.Counter()
    starts = [w.start for w in writes]
    ends = [w.end for w in writes]

    def committed_before(t: float) -> int:
        i = bisect.bisect_left(ends, t)
        return writes[i - 1].version if i else 0

    def started_before(t: float) -> int:
        i = bisect.bisect_left(starts, t)
        return writes[i - 1].version if i else 0

    runs: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    crashes: set[str] = set()
    timeouts: dict[str, list[float]] = collections.defaultdict(list)
    for r in records:
        failed = r["kind"] == "error"
        if r.get("results"):
            runs[r["results"]["run"]].append(r)
        elif failed and r["code"] == ChildSessionCode.CRASHED and r["mode"] not in CRASHING:
            crashes.add(r["text"])  # it names the worker's pid: one per worker that died
        elif failed and r["code"] == ChildSessionCode.TASK_TIMEOUT and r["mode"] not in TIMING_OUT:
            timeouts[r["key"]].append(r["ts"] if r["ts"] is not None else r["te"])
    counts["unexpected_crash"] += len(crashes)
    for seen in timeouts.values():
        seen.sort()
        counts["unexpected_timeout"] += 1 + sum(
            b - a > SAME_EXECUTION_GAP for a, b in itertools.pairwise(seen)
        )
    counts["shared:runs"] = len(runs)
    for run, group in runs.items():
        counts["shared:attached"] += len(group) - 1
        results = group[0]["results"]
        for r in group[1:]:
            if r["results"] != results:
                problems.append(
                    f"two tasks of shared run {run} got different results: {r['where']} "
                    f"{r['results']} and {group[0]['where']} {results}"
                )
        began, ended = float(results["began"]), float(results["ended"])
        version = int(results["version"])
        if version < committed_before(began):
            problems.append(
                f"shared run {run} ({group[0]['key']}) read data version {version}, but version "
                f"{committed_before(began)} was committed before it began: {group[0]['where']}"
            )
        if version > started_before(ended):
            problems.append(
                f"shared run {run} read data version {version}, which was not yet being "
                f"written when it ended: {group[0]['where']}"
            )
        delivered = [r["ts"] for r in group if r["ts"] is not None]
        if not delivered:
            continue
        first = min(delivered)
        for r in group:
            if r["te"] <= first:
                continue  # enqueued while the execution could still be attached to
            if r["cu"] != CHAOS_CACHED:
                problems.append(
                    f"{r['where']} (codeunit {r['cu']}, not cached) was enqueued "
                    f"{r['te'] - first:.3f} s after shared run {run}'s outcome reached a "
                    "client, yet got its results"
                )
                continue
            counts["cache:served"] += 1
            j = bisect.bisect_right(starts, began)
            if j < len(writes) and writes[j].end < r["te"]:
                w = writes[j]
                problems.append(
                    f"{r['where']} was served shared run {run}'s cached results, but the data "
                    f"changed after that run began (write of version {w.version} committed "
                    f"{r['te'] - w.end:.3f} s before the enqueue): {results}"
                )
    for reload in reloads:
        if reload.done is None:
            continue
        for gen, (enqueued, where) in latest_gen.items():
            if int(gen) < reload.gen and enqueued > reload.done:
                problems.append(
                    f"a task enqueued {enqueued - reload.done:.3f} s after the reload to code "
                    f"generation {reload.gen} had completed ran generation {gen}'s code: {where}"
                )
    return problems, counts
