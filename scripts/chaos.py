#!/usr/bin/env python3
"""Chaos run: many sessions, misbehaving codeunits, killed and frozen workers, dropped clients.

::

    scripts/chaos.py [--quick] [--seed N] [--tasks N] [--sessions N] [--clients N] [-v]

    harness (this process) ─────────────── starts ──▶ broker (python -m pbt_server run)
      │ monitor session: status polls, SIGKILL / SIGSTOP (+ SIGCONT later) of workers,     ▲
      │ RSS samples of the broker                                                          │
      ├─ ledger clients (chaos.py _client, aio or blocking): sessions that enqueue the     │
      │  Chaos codeunit (tests/chaos_codeunits.py), cancel by id (also racing completion), ├─
      │  change records, close pages, close or break their connection; each keeps a
      │  ledger of every task (handle, raw broker events, triggers, notifications) and
      │  checks it when the session ends
      └─ victim clients: the same load, SIGKILLed at random moments, then replaced

Checked (a violation names the seed, client, session, task and what was seen):

- every accepted task got exactly one outcome (completed / error / cancelled, or
  ConnectionLost for a connection we broke on purpose): none lost, none twice, none after a
  cancel; the handle's outcome never changes; the broker sent at most one outcome event per
  task, on the task's own page;
- completed results echo the task's own identity (token, page, record; the broker's task and
  session ids as the codeunit saw them), and each mode ends the way it must (a crashing mode
  never completes, a raising one fails with its own token in the text, ...); crashes and
  timeouts of well-behaved modes are counted and may not exceed the harness's kills + stops;
- triggers run at most once, only for completed / failed tasks, on the enqueuing page, never
  after that page moved to another record or closed; notifications match unhandled errors;
- after ``cancel()``, ``set_record()``, ``page.close()``, ``session.close()`` return (or the
  connection is broken), the affected handles are already resolved with the right code;
- at the end: the broker settles (no session or task left), still completes a fresh task,
  its RSS did not keep growing, and after it stops no worker, grandchild or zombie remains.

Frozen workers are resumed after ``STOP_HOLD``; one that by then still holds a task (never
acknowledged, so its timeout clock never started, and no ack deadline gave up on it) is
reported apart, as a "finding".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from pbt_server import client as blocking  # noqa: E402
from pbt_server import watchdog  # noqa: E402
from pbt_server.client import aio  # noqa: E402
from pbt_server.errors import (  # noqa: E402
    CANCELED_BY_ID,
    CANCELED_PAGE_CLOSED,
    CANCELED_RECORD_CHANGED,
    CANCELED_SESSION_CLOSED,
    TASK_CRASHED,
    TASK_TIMEOUT,
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ConnectionLost,
    EnqueueError,
    PbtError,
)
from tests.broker_process import BrokerProcess, alive  # noqa: E402
from tests.chaos_codeunits import CHAOS, RAISED_CODE, starttime  # noqa: E402
from tests.support import wait_until  # noqa: E402

SCRIPT: Final = Path(__file__).resolve()
MARKER: Final = "PBT_CHAOS_RUN"  # in the broker's environment, inherited by all it starts
PR_SET_CHILD_SUBREAPER: Final = 36

# Modes of the Chaos codeunit, how often each is picked, and how each may end.
MODE_WEIGHTS: Final = {
    "fast": 55.0,
    "sleep": 25.0,
    "raise": 6.0,
    "spin": 1.0,
    "exit": 2.0,
    "spawn": 2.0,
    "spawn_spin": 0.4,
    "spawn_exit": 0.5,
    "escape": 0.4,
    "escape_done": 0.5,
}
COMPLETING: Final = frozenset({"fast", "sleep", "spawn", "escape_done"})
TIMING_OUT: Final = frozenset({"spin", "spawn_spin", "escape"})
CRASHING: Final = frozenset({"exit", "spawn_exit"})
NORMAL_TIMEOUT_MS: Final = 2000
SPIN_TIMEOUT_MS: Final = (50, 200)
# A frozen worker holding a task is dead by then: its task timed out, or (never acknowledged)
# the broker's ack deadline, where there is one, gave up on it.
STOP_HOLD: Final = max(NORMAL_TIMEOUT_MS / 1000, getattr(watchdog, "ACK_TIMEOUT", 0.0)) + 2.5
LEVELS: Final = ("Ignore", "Warning", "Error")

# Per enqueue of a ledger session: the chance of each other action first.
P_CANCEL: Final = 0.03
P_RACE_CANCEL: Final = 0.03  # cancel the task just enqueued, racing its completion
P_SET_RECORD: Final = 0.012
P_CLOSE_PAGE: Final = 0.006
ENDINGS: Final = (("natural", 0.7), ("close", 0.15), ("abort", 0.15))

Outcome = tuple[str, str, str, "dict[str, str] | None"]  # kind, code, text, results


# --- configuration and report ---------------------------------------------------------------


@dataclasses.dataclass
class ChaosConfig:
    seed: int = 1
    tasks: int = 100_000  # accepted tasks over all ledger clients
    sessions: int = 24  # concurrent ledger sessions over all ledger clients
    clients: int = 3  # ledger client processes
    sync_clients: int = 1  # of which use the blocking client (threads) instead of aio
    victims: int = 1  # client processes that are SIGKILLed and replaced
    workers: int = 4
    queue_length: int = 30  # ChildSessionsMaxQueueLength: small, so QueueFull happens
    max_tasks_per_worker: int = 97  # MaxTasksPerWorker: workers retire mid-chaos too (0: never)
    kill_interval: float = 0.7  # mean seconds between worker SIGKILLs (0: none)
    stop_interval: float = 4.0  # mean seconds between worker SIGSTOPs (0: none)
    victim_lifetime: float = 3.0  # mean seconds a victim client lives
    stall_timeout: float = 60.0  # a session with no outcome for this long reports lost tasks
    deadline: float = 0.0  # seconds for the whole run (0: from the task count)
    log_level: str = "WARNING"
    verbose: bool = False
    # Self-test of the ledger: tamper with every 40th outcome event a client receives
    # ("drop", "duplicate", "misroute"); the run must then report violations.
    inject: str = ""

    @classmethod
    def quick(cls, seed: int = 1) -> ChaosConfig:
        return cls(
            seed=seed,
            tasks=6000,
            sessions=10,
            clients=2,
            kill_interval=0.4,
            stop_interval=3.0,
            victim_lifetime=1.5,
            stall_timeout=30.0,
        )


@dataclasses.dataclass
class ChaosReport:
    seed: int
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    findings: list[str] = dataclasses.field(default_factory=list)
    rss_mb: list[float] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    kept: Path | None = None  # the run directory, kept when something went wrong

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        c = self.counts

        def group(prefix: str) -> str:
            items = sorted((k[len(prefix) :], v) for k, v in c.items() if k.startswith(prefix))
            return ", ".join(f"{k} {v}" for k, v in items) or "none"

        accepted = c["accepted"]
        rate = accepted / self.elapsed if self.elapsed else 0.0
        lines = [
            f"chaos seed {self.seed}: {accepted} tasks accepted in {self.elapsed:.1f} s "
            f"({rate:.0f}/s), {c['sessions']} ledger sessions, {c['refused']} enqueues refused",
            f"  completed {c['outcome:completed']}; errors: {group('error:')}",
            f"  cancelled: {group('cancelled:')}; connection lost (deliberate): "
            f"{c['outcome:lost']}",
            f"  refused: {group('refused:')}",
            f"  modes: {group('mode:')}",
            f"  worker SIGKILLs {c['kills']}, SIGSTOPs {c['stops']} (resumed alive "
            f"{c['stops_resumed']}), victim clients killed {c['victims_killed']}",
            f"  sessions ended: {group('ended:')}; cancel() calls {c['cancel_calls']} "
            f"(True {c['cancel_true']}), set_record {c['set_record']}, page closes "
            f"{c['page_close']}",
            f"  triggers: completed {c['trigger:completed']}, error {c['trigger:error']}; "
            f"notifications: {group('notification:')}",
            f"  stopped under load: {group('burst:')}",
            f"  unexpected crashes {c['unexpected_crash']} + timeouts "
            f"{c['unexpected_timeout']} (<= kills + stops); spawned processes {c['spawned']}",
        ]
        if self.rss_mb:
            lines.append(
                f"  broker RSS: {self.rss_mb[0]:.1f} MB at start, max {max(self.rss_mb):.1f} "
                f"MB, {self.rss_mb[-1]:.1f} MB at end ({len(self.rss_mb)} samples)"
            )
        lines.append(f"  findings: {len(self.findings)}; violations: {len(self.violations)}")
        lines += [f"  FINDING {f}" for f in self.findings[:20]]
        lines += [f"  VIOLATION {v}" for v in self.violations[:50]]
        if len(self.violations) > 50:
            lines.append(f"  ... and {len(self.violations) - 50} more violations")
        if self.kept:
            lines.append(f"  run directory kept: {self.kept}")
        return "\n".join(lines)


# --- the ledger: what a client saw, checked when its session ends ----------------------------


@dataclasses.dataclass(eq=False)
class PageRec:
    page: Any  # blocking.Page | aio.Page
    seq: int
    gen: int = 0  # set_record calls begun
    settled_gen: int = 0  # set_record calls returned
    closing: bool = False  # close() begun
    closed: bool = False  # close() returned


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
    handle: Any = None
    task_id: int = 0
    enqueued_at: float = 0.0
    cancel_result: bool | None = None
    first: Outcome | None = None
    final: Outcome | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def describe(self, ep: Episode) -> str:
        raw = ep.raw.get(self.task_id, [])
        triggers = ep.triggers.get(self.task_id, [])
        first = self.first and self.first[:3]
        final = self.final and self.final[:3]
        return (
            f"[seed {ep.client.seed} client {ep.client.index} episode {ep.seq} session "
            f"{ep.session_id} page {self.page.page.id} task {self.task_id} token {self.token} "
            f"mode {self.mode} record {self.record!r}] first outcome {first}, final {final}, "
            f"broker events {raw}, triggers {[(t.kind, t.page_seq, t.gen) for t in triggers]}, "
            f"notes {self.notes}, "
            f"episode ended {ep.ended!r}"
        )


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


def classify(error: BaseException | None, results: dict[str, str] | None) -> Outcome:
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


def expected_results(rec: TaskRec, session_id: int) -> dict[str, str]:
    results = dict(rec.params)
    results["ctx_task"] = str(rec.task_id)
    results["ctx_session"] = str(session_id)
    results["ctx_record"] = rec.record
    return results


class ClientState:
    """One client process: its seed, budget and totals."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.index: int = spec["index"]
        self.seed: int = spec["seed"]
        self.socket: str = spec["socket"]
        self.pids: str = spec["pids"]
        self.victim: bool = spec["victim"]
        self.remaining: int = spec["tasks"]
        self.budget: int = spec["tasks"]
        self.lanes: int = spec["sessions"]
        self.stall_timeout: float = spec["stall_timeout"]
        self.counts: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.episodes = 0
        self.inject: str = spec.get("inject", "")
        self.outcome_events = 0

    def tamper(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The frames the client library gets for ``message`` (all of it, unless injecting)."""
        if not self.inject or message.get("op") not in ("completed", "failed", "cancelled"):
            return [message]
        with self.lock:
            self.outcome_events += 1
            if self.outcome_events % 40:
                return [message]
            if self.inject == "misroute" and message["op"] != "completed":
                return [message]
            self.counts[f"injected:{self.inject}"] += 1
        if self.inject == "drop":
            return []
        if self.inject == "duplicate":
            return [message, dict(message)]
        if self.inject == "misroute":
            results = dict(message.get("results") or {})
            results["token"] = "someone-else"
            return [dict(message, results=results)]
        raise ValueError(f"unknown fault to inject: {self.inject!r}")

    def claim(self, rng: random.Random) -> tuple[int, int]:
        """An episode number and how many tasks it should get accepted (0: none left)."""
        with self.lock:
            self.episodes += 1
            longest = max(60, min(1500, self.budget // (4 * self.lanes)))
            want = rng.choice((rng.randint(5, 60), rng.randint(30, longest), longest))
            claim = want if self.victim else min(want, self.remaining)
            self.remaining -= claim
            return self.episodes, claim

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


class Episode:
    """One session's life: what both client flavours record and how it is checked."""

    strict: bool = True  # one thread: local state changes are atomic with the checks

    def __init__(self, client: ClientState, seq: int, rng: random.Random) -> None:
        self.client = client
        self.seq = seq
        self.rng = rng
        self.session_id = 0
        self.pages: list[PageRec] = []
        self.all_pages: list[PageRec] = []
        self.tasks: list[TaskRec] = []
        self.by_id: dict[int, TaskRec] = {}
        self.pending: list[TaskRec] = []  # accepted, outcome not yet observed
        # Written by the client's reader (raw) and dispatcher (triggers, notes).
        self.raw: dict[int, list[tuple[str, str, object]]] = collections.defaultdict(list)
        self.unknown_events: list[tuple[str, object]] = []
        self.triggers: dict[int, list[TriggerRec]] = collections.defaultdict(list)
        self.notifications: list[tuple[int, str, str, int]] = []
        self.ended = ""
        self.last_task_id = 0
        self.n = 0
        self.counts: collections.Counter[str] = collections.Counter()  # merged at the end
        self.started = time.monotonic()
        self.last_progress = time.monotonic()

    # --- building blocks -------------------------------------------------------------------

    def violation(self, text: str, rec: TaskRec | None = None) -> None:
        where = (
            rec.describe(self)
            if rec
            else f"[seed {self.client.seed} client {self.client.index} episode {self.seq} "
            f"session {self.session_id}]"
        )
        self.client.violation(f"{text}: {where}")

    def on_frame(self, message: Mapping[str, Any]) -> None:
        """Every broker frame, before the client library sees it (reader side)."""
        op = message.get("op")
        if op in ("completed", "failed", "cancelled"):
            task = message.get("task")
            if type(task) is int:
                self.raw[task].append((str(op), str(message.get("code", "")), message.get("page")))
            else:
                self.unknown_events.append((str(op), task))

    def new_task(self) -> TaskRec:
        rng = self.rng
        page = rng.choice(self.pages)
        mode = rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]
        self.n += 1
        token = f"c{self.client.index}e{self.seq}n{self.n}"
        params = {
            "mode": mode,
            "token": token,
            "page": str(page.seq),
            "episode": str(self.seq),
            "ms": str(rng.randint(1, 30) if mode == "sleep" else rng.randint(1, 255)),
            "pids": self.client.pids,
        }
        if rng.random() < 0.05:  # sometimes a larger payload
            params["pad"] = "x" * rng.randint(100, 20_000)
        return TaskRec(
            token=token,
            mode=mode,
            page=page,
            gen=page.gen,
            record=page.page.record_id,
            params=params,
            level=rng.choice(LEVELS),
            handled=rng.random() < 0.5,
            raise_in_trigger=rng.random() < 0.02,
        )

    @staticmethod
    def timeout_of(rec: TaskRec, rng: random.Random) -> int:
        if rec.mode in TIMING_OUT:
            return rng.randint(*SPIN_TIMEOUT_MS)
        return NORMAL_TIMEOUT_MS

    def accepted(self, rec: TaskRec, handle: Any) -> None:
        rec.handle = handle
        rec.task_id = handle.id
        rec.enqueued_at = time.monotonic() - self.started
        if handle.id != self.last_task_id + 1:
            self.violation(f"task id {handle.id} after {self.last_task_id}: ids must be 1, 2, ...")
            self.by_id.pop(self.last_task_id + 1, None)
        self.last_task_id = max(self.last_task_id, handle.id)
        self.by_id[handle.id] = rec
        self.tasks.append(rec)
        self.pending.append(rec)
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

    def observe(self, rec: TaskRec, outcome: Outcome) -> None:
        if rec.first is None:
            rec.first = outcome
            self.last_progress = time.monotonic()

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

    def register(self, rec: TaskRec) -> int:
        """Put ``rec`` under the id it will get: its outcome may come before enqueue returns."""
        expected = self.last_task_id + 1
        self.by_id[expected] = rec
        return expected

    # --- the end of the episode --------------------------------------------------------------

    def verify(self) -> None:
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
            if owner is not None and owner.page.page.id != page_id:
                self.violation(f"notification {severity} {code} for page {page_id}", owner)
            counts[f"notification:{severity}"] += 1
        with self.client.lock:
            self.client.counts.update(counts)

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
        raw = self.raw.get(rec.task_id, [])
        if len(raw) > 1:
            self.violation(f"the broker sent {len(raw)} outcome events", rec)
        for _op, _code, page_id in raw:
            if page_id != rec.page.page.id:
                self.violation(f"outcome event for page {page_id}", rec)
        resolved_locally = kind == "lost" or (
            kind == "cancelled" and code == CANCELED_SESSION_CLOSED
        )
        if resolved_locally:
            if raw and self.strict:
                self.violation("a broker event arrived, yet the task ended locally", rec)
        elif len(raw) != 1:
            self.violation(f"{kind} {code} without exactly one broker event", rec)
        else:
            op, raw_code = raw[0][:2]
            locally_cancelled = kind == "cancelled" and code in (
                CANCELED_RECORD_CHANGED,
                CANCELED_PAGE_CLOSED,
            )
            consistent = (
                (kind == "completed" and op == "completed")
                or (kind == "error" and op == "failed" and raw_code == code)
                or (kind == "cancelled" and op == "cancelled" and raw_code == code)
                or (locally_cancelled and op in ("completed", "failed"))
            )
            if not consistent:
                self.violation(f"broker event {raw[0]} does not match the outcome", rec)
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
            elif code == TASK_TIMEOUT:
                if rec.mode not in TIMING_OUT:
                    counts["unexpected_timeout"] += 1
            elif code == TASK_CRASHED:
                if rec.mode not in CRASHING:
                    counts["unexpected_crash"] += 1
            else:
                self.violation(f"unexpected error code {code}: {text:.200}", rec)
        elif kind == "cancelled":
            allowed = {
                CANCELED_BY_ID: rec.cancel_result is True,
                CANCELED_RECORD_CHANGED: rec.page.gen != rec.gen,
                CANCELED_PAGE_CLOSED: rec.page.closing,
                CANCELED_SESSION_CLOSED: self.ended in ("close", "stalled", "broken"),
            }
            if not allowed.get(code, False):
                self.violation(f"cancelled with {code}, which nothing asked for", rec)
        elif kind == "lost":
            if self.ended not in ("abort", "broken"):
                self.violation("ConnectionLost on a connection nobody broke", rec)
        else:
            self.violation(f"unexpected outcome {code}: {text:.200}", rec)
        if rec.cancel_result is True and (kind, code) != ("cancelled", CANCELED_BY_ID):
            self.violation("cancel() returned True but the task was not cancelled by id", rec)
        return self._verify_triggers(rec, out)

    def _verify_triggers(self, rec: TaskRec, out: Outcome) -> tuple[int, str, str] | None:
        kind, code, _text, results = out
        triggers = self.triggers.get(rec.task_id, [])
        if len(triggers) > 1:
            self.violation(f"{len(triggers)} triggers ran", rec)
        if not triggers:
            page = rec.page
            untouched = page.gen == rec.gen and not page.closing
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
        if moved:
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


# --- the asyncio client flavour -----------------------------------------------------------------


class AioEpisode(Episode):
    session: aio.Session

    async def run(self, claim: int) -> None:
        rng = self.rng
        self.session = await aio.connect(self.client.socket, timeout=60)
        self.session_id = self.session.id
        core = self.session._core
        receive = core.receive

        def spy(message: Any) -> Any:
            result = None
            for frame in self.client.tamper(message):
                self.on_frame(frame)
                got = receive(frame)
                result = got if result is None else result
            self.progress.set()
            return result

        core.receive = spy  # type: ignore[method-assign]
        self.session.on_notification = self.notification
        self.progress = asyncio.Event()
        try:
            for _ in range(rng.randint(1, 3)):
                await self.open_page()
            window = rng.choice((1, 3, 8, 20, 30, 40, 80))
            ending = rng.choices([e for e, _ in ENDINGS], weights=[w for _, w in ENDINGS])[0]
            accepted = 0
            while accepted < claim:
                r = rng.random()
                if r < P_CANCEL and self.pending:
                    await self.cancel(rng.choice(self.pending))
                elif r < P_CANCEL + P_SET_RECORD:
                    await self.set_record(rng.choice(self.pages))
                elif r < P_CANCEL + P_SET_RECORD + P_CLOSE_PAGE:
                    await self.close_page(rng.choice(self.pages))
                if await self.enqueue():
                    accepted += 1
                elif self.pending:  # queue full: retry once something ended, not in a loop
                    await self.wait_progress()
                while len(self.pending) >= window and not self.ended:
                    await self.wait_progress()
                if self.ended:
                    break
            if not self.ended:
                await self.finish(ending)
        except (ConnectionLost, OSError) as err:
            self.violation(f"the connection broke: {err}")
            self.ended = "broken"
        finally:
            await self.session.close()
            for rec in self.tasks:
                self.sweep_one(rec)
                rec.final = await self.outcome(rec)
        self.verify()

    async def outcome(self, rec: TaskRec) -> Outcome | None:
        if not rec.handle.done():
            return None
        error = await rec.handle.exception()
        return classify(error, None if error else await rec.handle.result())

    def sweep_one(self, rec: TaskRec) -> bool:
        if rec.first is None and rec.handle.done():
            error = rec.handle._error
            self.observe(rec, classify(error, None if error else rec.handle._results))
        return rec.first is not None

    def sweep(self) -> None:
        self.pending = [rec for rec in self.pending if not self.sweep_one(rec)]

    async def wait_progress(self) -> None:
        self.sweep()
        if not self.pending:
            return
        self.progress.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.progress.wait()
        self.sweep()
        if self.pending and time.monotonic() - self.last_progress > self.client.stall_timeout:
            await self.stalled()

    async def stalled(self) -> None:
        try:
            status = await self.session.status()
        except PbtError as err:
            status = {"error": str(err)}
        for rec in self.pending:
            self.violation(
                f"no outcome after {self.client.stall_timeout:.0f} s without progress "
                f"(broker status {status})",
                rec,
            )
        self.ended = "stalled"

    async def open_page(self) -> None:
        seq = len(self.all_pages) + 1
        page = await self.session.open_page(f"Chaos {seq}", record_id=f"R{self.rng.randint(1, 9)}")
        rec = PageRec(page, seq)
        page.on_completed = lambda task_id, results: self.trigger_completed(rec, task_id, results)
        page.on_error = lambda task_id, code, text, stack: self.trigger_error(
            rec, task_id, code, text, stack
        )
        self.pages.append(rec)
        self.all_pages.append(rec)

    async def enqueue(self) -> bool:
        rec = self.new_task()
        expected_id = self.register(rec)
        try:
            handle = await rec.page.page.enqueue_background_task(
                CHAOS, rec.params, timeout=self.timeout_of(rec, self.rng), error_level=rec.level
            )
        except EnqueueError as err:
            del self.by_id[expected_id]
            self.counts["refused"] += 1
            self.counts[f"refused:{err.code}"] += 1
            if err.code != "ChildSessionQueueFull":
                self.violation(f"enqueue refused: {err}")
            return False
        self.accepted(rec, handle)
        if self.rng.random() < P_RACE_CANCEL:
            delay = self.rng.choice((0.0, 0.0, 0.001, 0.003, 0.01, 0.03))
            if delay:
                await asyncio.sleep(delay)
            await self.cancel(rec)
        return True

    async def cancel(self, rec: TaskRec) -> None:
        if rec.cancel_result is not None:
            return
        self.counts["cancel_calls"] += 1
        result = await rec.handle.cancel()
        rec.cancel_result = result
        rec.notes.append(f"cancel()={result} at {time.monotonic() - self.started:.3f}")
        self.counts["cancel_true"] += result
        if not self.sweep_one(rec):
            self.violation(f"not resolved when cancel() returned {result}", rec)
        elif result and rec.first is not None and rec.first[:2] != ("cancelled", CANCELED_BY_ID):
            self.violation("cancel() returned True, the handle says otherwise", rec)

    def page_pending(self, page: PageRec) -> list[TaskRec]:
        return [rec for rec in self.pending if rec.page is page and not self.sweep_one(rec)]

    async def set_record(self, page: PageRec) -> None:
        self.counts["set_record"] += 1
        affected = self.page_pending(page)
        page.gen += 1
        record = f"R{self.rng.randint(10, 10**6)}"
        for rec in affected:
            rec.notes.append(f"set_record {record!r}")
        await page.page.set_record(record)
        page.settled_gen = page.gen
        for rec in affected:
            self.sweep_one(rec)
        self.expect_done(affected, "set_record()", {CANCELED_RECORD_CHANGED})

    async def close_page(self, page: PageRec) -> None:
        self.counts["page_close"] += 1
        affected = self.page_pending(page)
        page.closing = True
        for rec in affected:
            rec.notes.append("page closed")
        await page.page.close()
        page.closed = True
        self.pages.remove(page)
        for rec in affected:
            self.sweep_one(rec)
        self.expect_done(affected, "page.close()", {CANCELED_PAGE_CLOSED})
        await self.open_page()

    async def finish(self, ending: str) -> None:
        if ending == "natural":
            while self.pending and not self.ended:
                await self.wait_progress()
            if self.ended:
                return
            await self.wait_triggers()
            self.ended = "natural"
            return
        self.sweep()
        affected = list(self.pending)
        for rec in affected:
            rec.notes.append(f"session {ending}")
        if ending == "close":
            self.ended = "close"
            await self.session.close()
            self.sweep()
            self.expect_done(affected, "session.close()", {CANCELED_SESSION_CLOSED})
        else:
            self.ended = "abort"
            connection = self.session._connection
            assert connection.transport is not None
            connection.transport.abort()
            async with asyncio.timeout(30):
                await connection.disconnected
            self.sweep()
            self.expect_done(affected, "the connection was broken", {"lost"})

    async def wait_triggers(self) -> None:
        """Let the dispatcher run the triggers that are due (bounded)."""
        deadline = time.monotonic() + 30
        while self.due() and time.monotonic() < deadline:  # noqa: ASYNC110 (polled state)
            await asyncio.sleep(0.01)


async def run_aio_client(client: ClientState, sessions: int) -> None:
    async def lane(lane_no: int) -> None:
        rng = random.Random(f"{client.seed}/{client.index}/{lane_no}")
        while True:
            seq, claim = client.claim(rng)
            if claim <= 0:
                return
            await AioEpisode(client, seq, random.Random(f"{client.seed}/{seq}/{claim}")).run(claim)

    async with asyncio.TaskGroup() as group:
        for lane_no in range(sessions):
            group.create_task(lane(lane_no))


# --- the blocking client flavour (threads) ------------------------------------------------------


class SyncEpisode(Episode):
    """The same episode with the blocking client: a reader and a dispatcher thread per session.

    Local state changes race the reader here, so the checks that need them atomic are relaxed
    (``strict = False``): e.g. an outcome may still arrive between our snapshot and the
    ``set_record`` call.
    """

    strict = False
    session: blocking.Session

    def run(self, claim: int) -> None:
        rng = self.rng
        self.progress = threading.Event()
        self.session = blocking.connect(self.client.socket, timeout=60)
        self.session_id = self.session.id
        core = self.session._core
        receive = core.receive

        def spy(message: Any) -> Any:
            result = None
            for frame in self.client.tamper(message):
                self.on_frame(frame)
                got = receive(frame)
                result = got if result is None else result
            self.progress.set()
            return result

        core.receive = spy  # type: ignore[method-assign]
        self.session.on_notification = self.notification
        try:
            for _ in range(rng.randint(1, 3)):
                self.open_page()
            window = rng.choice((1, 3, 8, 20, 40))
            ending = rng.choices([e for e, _ in ENDINGS], weights=[w for _, w in ENDINGS])[0]
            accepted = 0
            while accepted < claim:
                r = rng.random()
                if r < P_CANCEL and self.pending:
                    self.cancel(rng.choice(self.pending))
                elif r < P_CANCEL + P_SET_RECORD:
                    self.set_record(rng.choice(self.pages))
                elif r < P_CANCEL + P_SET_RECORD + P_CLOSE_PAGE:
                    self.close_page(rng.choice(self.pages))
                if self.enqueue():
                    accepted += 1
                elif self.pending:  # queue full: retry once something ended, not in a loop
                    self.wait_progress()
                while len(self.pending) >= window and not self.ended:
                    self.wait_progress()
                if self.ended:
                    break
            if not self.ended:
                self.finish(ending)
        except (ConnectionLost, OSError) as err:
            self.violation(f"the connection broke: {err}")
            self.ended = "broken"
        finally:
            self.session.close()
            for rec in self.tasks:
                self.sweep_one(rec)
                rec.final = self.outcome(rec)
        self.verify()

    def outcome(self, rec: TaskRec) -> Outcome | None:
        if not rec.handle.done():
            return None
        error = rec.handle.exception(timeout=0)
        return classify(error, None if error else rec.handle.result(timeout=0))

    def sweep_one(self, rec: TaskRec) -> bool:
        if rec.first is None:
            outcome = self.outcome(rec)
            if outcome is not None:
                self.observe(rec, outcome)
        return rec.first is not None

    def sweep(self) -> None:
        self.pending = [rec for rec in self.pending if not self.sweep_one(rec)]

    def wait_progress(self) -> None:
        self.progress.clear()
        self.sweep()
        if not self.pending:
            return
        self.progress.wait(1.0)
        self.sweep()
        if self.pending and time.monotonic() - self.last_progress > self.client.stall_timeout:
            try:
                status: object = self.session.status()
            except PbtError as err:
                status = {"error": str(err)}
            for rec in self.pending:
                self.violation(
                    f"no outcome after {self.client.stall_timeout:.0f} s without progress "
                    f"(broker status {status})",
                    rec,
                )
            self.ended = "stalled"

    def open_page(self) -> None:
        seq = len(self.all_pages) + 1
        page = self.session.open_page(f"Chaos {seq}", record_id=f"R{self.rng.randint(1, 9)}")
        rec = PageRec(page, seq)
        page.on_completed = lambda task_id, results: self.trigger_completed(rec, task_id, results)
        page.on_error = lambda task_id, code, text, stack: self.trigger_error(
            rec, task_id, code, text, stack
        )
        self.pages.append(rec)
        self.all_pages.append(rec)

    def enqueue(self) -> bool:
        rec = self.new_task()
        expected_id = self.register(rec)
        try:
            handle = rec.page.page.enqueue_background_task(
                CHAOS, rec.params, timeout=self.timeout_of(rec, self.rng), error_level=rec.level
            )
        except EnqueueError as err:
            del self.by_id[expected_id]
            self.counts["refused"] += 1
            self.counts[f"refused:{err.code}"] += 1
            if err.code != "ChildSessionQueueFull":
                self.violation(f"enqueue refused: {err}")
            return False
        self.accepted(rec, handle)
        if self.rng.random() < P_RACE_CANCEL:
            self.cancel(rec)
        return True

    def cancel(self, rec: TaskRec) -> None:
        if rec.cancel_result is not None:
            return
        self.counts["cancel_calls"] += 1
        result = rec.handle.cancel()
        rec.cancel_result = result
        rec.notes.append(f"cancel()={result} at {time.monotonic() - self.started:.3f}")
        self.counts["cancel_true"] += result
        if not self.sweep_one(rec):
            self.violation(f"not resolved when cancel() returned {result}", rec)
        elif result and rec.first is not None and rec.first[:2] != ("cancelled", CANCELED_BY_ID):
            self.violation("cancel() returned True, the handle says otherwise", rec)

    def page_pending(self, page: PageRec) -> list[TaskRec]:
        return [rec for rec in self.pending if rec.page is page and not self.sweep_one(rec)]

    def set_record(self, page: PageRec) -> None:
        self.counts["set_record"] += 1
        affected = self.page_pending(page)
        page.gen += 1
        record = f"R{self.rng.randint(10, 10**6)}"
        for rec in affected:
            rec.notes.append(f"set_record {record!r}")
        page.page.set_record(record)
        page.settled_gen = page.gen
        for rec in affected:
            self.sweep_one(rec)
        self.expect_done(affected, "set_record()", {CANCELED_RECORD_CHANGED})

    def close_page(self, page: PageRec) -> None:
        self.counts["page_close"] += 1
        affected = self.page_pending(page)
        page.closing = True
        for rec in affected:
            rec.notes.append("page closed")
        page.page.close()
        page.closed = True
        self.pages.remove(page)
        for rec in affected:
            self.sweep_one(rec)
        self.expect_done(affected, "page.close()", {CANCELED_PAGE_CLOSED})
        self.open_page()

    def finish(self, ending: str) -> None:
        if ending == "natural":
            while self.pending and not self.ended:
                self.wait_progress()
            if self.ended:
                return
            self.wait_triggers()
            self.ended = "natural"
            return
        self.sweep()
        affected = list(self.pending)
        for rec in affected:
            rec.notes.append(f"session {ending}")
        if ending == "close":
            self.ended = "close"
            self.session.close()
            self.sweep()
            self.expect_done(affected, "session.close()", {CANCELED_SESSION_CLOSED})
        else:
            self.ended = "abort"
            with contextlib.suppress(OSError):
                self.session._sock.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + 30
            while not self.session.closed and time.monotonic() < deadline:
                self.progress.wait(0.05)
            self.sweep()
            self.expect_done(affected, "the connection was broken", {"lost"})

    def wait_triggers(self) -> None:
        deadline = time.monotonic() + 30
        while self.due() and time.monotonic() < deadline:
            time.sleep(0.01)


def run_sync_client(client: ClientState, sessions: int) -> None:
    errors: list[BaseException] = []

    def lane(lane_no: int) -> None:
        rng = random.Random(f"{client.seed}/{client.index}/{lane_no}")
        try:
            while True:
                seq, claim = client.claim(rng)
                if claim <= 0:
                    return
                SyncEpisode(client, seq, random.Random(f"{client.seed}/{seq}/{claim}")).run(claim)
        except BaseException as err:
            errors.append(err)
            raise

    threads = [
        threading.Thread(target=lane, args=(n,), name=f"chaos-lane-{n}") for n in range(sessions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def client_main(spec: Mapping[str, Any]) -> int:
    """A client process: run the episodes, then write counts and violations as JSON."""
    client = ClientState(spec)
    result = Path(spec["result"])
    progress = result.with_suffix(".progress")
    stop = threading.Event()

    def report_progress() -> None:
        while not stop.wait(2.0):
            progress.write_text(str(client.counts["accepted"]))

    reporter = threading.Thread(target=report_progress, daemon=True)
    reporter.start()
    crashed = ""
    try:
        if spec["flavour"] == "sync":
            run_sync_client(client, spec["sessions"])
        else:
            asyncio.run(run_aio_client(client, spec["sessions"]))
    except BaseException as err:  # report it: the harness turns it into a violation
        import traceback

        crashed = "".join(traceback.format_exception(err))
    stop.set()
    reporter.join()
    text = json.dumps(
        {"counts": dict(client.counts), "violations": client.violations, "crashed": crashed}
    )
    result.with_suffix(".tmp").write_text(text)
    result.with_suffix(".tmp").rename(result)
    return 0


# --- the harness ----------------------------------------------------------------------------


class ChaosBroker(BrokerProcess):
    """A broker whose environment carries the run's marker, so every process it starts does."""

    marker: str = ""

    def launch(self) -> None:
        env = dict(os.environ, **{MARKER: self.marker})
        with open(self.directory / "stderr.txt", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pbt_server", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        wait_until(self._ready, timeout=30)
        self.seen_workers |= set(self.worker_pids())


@contextlib.contextmanager
def adopting_orphans() -> Iterator[list[tuple[int, str, str]]]:
    """Be a child subreaper meanwhile: what the broker leaves behind when it exits (live or
    zombie) reparents to us. Yields a list, filled on exit with (pid, name, status) of each
    such process, which is then killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    adopted: list[tuple[int, str, str]] = []
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield adopted
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for child in me.children():
            if child.pid in before:
                continue
            with contextlib.suppress(psutil.Error):
                adopted.append((child.pid, child.name(), str(child.status())))
                child.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(proc)
        except OSError:
            continue
    return found


@dataclasses.dataclass(eq=False)
class ClientProcess:
    index: int
    victim: bool
    process: subprocess.Popen[bytes]
    result: Path
    started: float
    lifetime: float = 0.0


class Harness:
    def __init__(self, config: ChaosConfig, report: ChaosReport) -> None:
        self.config = config
        self.report = report
        self.rng = random.Random(f"harness/{config.seed}")
        self.counts = report.counts
        self.run_dir = Path(tempfile.mkdtemp(prefix="pbtchaos-", dir="/tmp"))
        self.pids_dir = self.run_dir / "pids"
        self.pids_dir.mkdir()
        self.marker = uuid.uuid4().hex
        self.broker: ChaosBroker | None = None
        self.monitor: blocking.Session | None = None
        self.ledger: list[ClientProcess] = []
        self.victims: list[ClientProcess] = []
        self.stopped: dict[int, tuple[float, str, object]] = {}  # pid -> (when, state, task)
        self.next_client = 0
        self.status: dict[str, Any] = {}

    def log(self, text: str) -> None:
        if self.config.verbose:
            print(f"[chaos {time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # --- setup -----------------------------------------------------------------------------

    def start_broker(self) -> None:
        ChaosBroker.marker = self.marker
        broker = ChaosBroker.start(
            {
                "Workers": {
                    "Count": str(self.config.workers),
                    "MaxTasksPerWorker": str(self.config.max_tasks_per_worker),
                },
                "Codeunits": {"Modules": "tests.codeunits tests.chaos_codeunits"},
                "Server": {"LogLevel": self.config.log_level},
                "AsynchronousProcessing": {
                    "ChildSessionsMaxQueueLength": str(self.config.queue_length),
                },
            }
        )
        assert isinstance(broker, ChaosBroker)
        self.broker = broker
        self.monitor = broker.connect()

    def spawn_client(self, *, victim: bool, tasks: int, sessions: int, flavour: str) -> None:
        assert self.broker is not None
        index = self.next_client
        self.next_client += 1
        result = self.run_dir / f"client-{index}.json"
        spec = {
            "index": index,
            "seed": self.config.seed,
            "socket": str(self.broker.socket),
            "pids": str(self.pids_dir),
            "victim": victim,
            "tasks": tasks,
            "sessions": sessions,
            "flavour": flavour,
            "stall_timeout": self.config.stall_timeout,
            "inject": "" if victim else self.config.inject,
            "result": str(result),
        }
        with open(self.run_dir / f"client-{index}.out", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "_client", json.dumps(spec)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = ClientProcess(index, victim, process, result, time.monotonic())
        if victim:
            proc.lifetime = self.rng.expovariate(1 / self.config.victim_lifetime)
            self.victims.append(proc)
        else:
            self.ledger.append(proc)

    # --- chaos -----------------------------------------------------------------------------

    def is_worker(self, pid: int) -> bool:
        assert self.broker is not None
        try:
            proc = psutil.Process(pid)
            return proc.ppid() == self.broker.pid and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def poll_status(self) -> None:
        assert self.monitor is not None
        assert self.broker is not None
        self.status = dict(self.monitor.status())
        pids = {w["pid"] for w in self.status["workers"] if w["pid"]}
        self.broker.seen_workers |= pids

    def pick_worker(self, prefer_busy: float) -> dict[str, Any] | None:
        workers = [w for w in self.status.get("workers", []) if w["pid"]]
        busy = [w for w in workers if w["task"]]
        pool = busy if busy and self.rng.random() < prefer_busy else workers
        return self.rng.choice(pool) if pool else None

    def kill_worker(self) -> None:
        worker = self.pick_worker(0.7)
        if worker is not None and self.is_worker(worker["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker["pid"], signal.SIGKILL)
                self.counts["kills"] += 1
                self.stopped.pop(worker["pid"], None)

    def stop_worker(self) -> None:
        worker = self.pick_worker(0.6)
        pid = worker["pid"] if worker else 0
        if worker and pid not in self.stopped and self.is_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.counts["stops"] += 1
                self.stopped[pid] = (time.monotonic(), worker["state"], worker["task"])

    def resume_workers(self, *, all_now: bool = False) -> None:
        now = time.monotonic()
        for pid, (when, state, task) in list(self.stopped.items()):
            if not all_now and now - when < STOP_HOLD:
                continue
            del self.stopped[pid]
            if not self.is_worker(pid):
                continue  # the watchdog (or a kill) took it, as it should
            entry = next((w for w in self.status.get("workers", []) if w["pid"] == pid), None)
            if entry is not None and entry["task"] and not all_now:
                self.report.findings.append(
                    f"worker {pid} was SIGSTOPped while {state} (task {task}); "
                    f"{now - when:.1f} s later it is alive, {entry['state']}, and holds task "
                    f"{entry['task']}, which never timed out (a task handed to a frozen worker "
                    "is never acknowledged, so its timeout clock never starts)"
                )
                self.counts["stalled_starts"] += 1
            self.counts["stops_resumed"] += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def churn_victims(self, keep: bool) -> None:
        now = time.monotonic()
        for victim in list(self.victims):
            if victim.process.poll() is None and now - victim.started < victim.lifetime and keep:
                continue
            if victim.process.poll() is None:
                victim.process.kill()
                self.counts["victims_killed"] += 1
            victim.process.wait()
            self.victims.remove(victim)
        while keep and len(self.victims) < self.config.victims:
            self.spawn_client(victim=True, tasks=0, sessions=4, flavour="aio")

    def sample_rss(self) -> None:
        assert self.broker is not None
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(self.broker.pid).memory_info().rss
            self.report.rss_mb.append(rss / 2**20)

    def progress(self) -> int:
        total = 0
        for proc in self.ledger:
            with contextlib.suppress(OSError, ValueError):
                total += int(proc.result.with_suffix(".progress").read_text() or 0)
        return total

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        self.t0 = time.monotonic()
        self.start_broker()
        per_client = config.tasks // config.clients
        lanes = max(1, config.sessions // config.clients)
        for n in range(config.clients):
            tasks = per_client + (config.tasks - per_client * config.clients if n == 0 else 0)
            flavour = "sync" if n < config.sync_clients else "aio"
            self.spawn_client(victim=False, tasks=tasks, sessions=lanes, flavour=flavour)
        deadline = self.t0 + (config.deadline or 300 + config.tasks / 20)
        # The first kill and stop come early, so even a short run has some of each.
        next_kill = self.next_event(config.kill_interval, first_within=1.0)
        next_stop = self.next_event(config.stop_interval, first_within=2.0)
        next_rss = next_log = time.monotonic()
        while any(proc.process.poll() is None for proc in self.ledger):
            now = time.monotonic()
            if now > deadline:
                self.report.violations.append(
                    f"the run did not finish within {deadline - self.t0:.0f} s "
                    f"({self.progress()} tasks accepted); status {self.status}"
                )
                break
            self.poll_status()
            if now >= next_kill:
                self.kill_worker()
                next_kill = self.next_event(config.kill_interval)
            if now >= next_stop:
                self.stop_worker()
                next_stop = self.next_event(config.stop_interval)
            self.resume_workers()
            self.churn_victims(keep=True)
            if now >= next_rss:
                self.sample_rss()
                next_rss = now + 0.5
            if now >= next_log:
                self.log(
                    f"{self.progress()} accepted; kills {self.counts['kills']}, stops "
                    f"{self.counts['stops']}, victims killed {self.counts['victims_killed']}"
                )
                next_log = now + 10
            time.sleep(self.rng.uniform(0.02, 0.1))  # the monitor's polling interval
        self.resume_workers(all_now=True)
        self.churn_victims(keep=False)
        for proc in self.ledger:
            if proc.process.poll() is None:
                proc.process.kill()
            proc.process.wait()
        self.collect()
        self.settle()
        self.sample_rss()
        self.check_rss()
        self.stop_broker()

    def next_event(self, mean: float, first_within: float = float("inf")) -> float:
        if mean <= 0:
            return float("inf")
        return time.monotonic() + min(self.rng.expovariate(1 / mean), first_within)

    def collect(self) -> None:
        for proc in self.ledger:
            try:
                data = json.loads(proc.result.read_text())
            except (OSError, ValueError):
                out = (self.run_dir / f"client-{proc.index}.out").read_text()[-3000:]
                self.report.violations.append(
                    f"client {proc.index} left no result (exit {proc.process.returncode}): {out}"
                )
                continue
            self.counts.update(data["counts"])
            self.report.violations += data["violations"]
            if data["crashed"]:
                self.report.violations.append(f"client {proc.index} crashed: {data['crashed']}")
        # A kill crashes at most one task; a stop times out (or, unacknowledged, crashes) one.
        c = self.counts
        if c["unexpected_crash"] + c["unexpected_timeout"] > c["kills"] + c["stops"]:
            self.report.violations.append(
                f"{c['unexpected_crash']} well-behaved tasks crashed and "
                f"{c['unexpected_timeout']} timed out, but the harness killed only "
                f"{c['kills']} workers and froze {c['stops']}"
            )

    def settle(self) -> None:
        """No chaos left: the broker must settle, reap everything, and still serve."""
        assert self.monitor is not None
        assert self.broker is not None
        broker = self.broker
        monitor = self.monitor
        deadline = time.monotonic() + 60
        while True:
            self.poll_status()
            sessions = [s for s in self.status["sessions"] if s["id"] != monitor.id]
            workers = self.status["workers"]
            busy = [w for w in workers if w["state"] != "idle"]
            if not sessions and not busy:
                break
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"the broker did not settle within 60 s: sessions {sessions}, workers {busy}"
                )
                break
            time.sleep(0.05)
        pids = {w["pid"] for w in self.status["workers"]}
        deadline = time.monotonic() + 30
        while True:
            try:
                children = psutil.Process(broker.pid).children()
                extra = [(p.pid, p.name(), str(p.status())) for p in children if p.pid not in pids]
            except psutil.Error as err:
                extra = [(0, str(err), "")]
            if not extra:
                break
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"the broker still has non-worker children (or zombies) 30 s after the "
                    f"chaos: {extra[:20]}"
                )
                break
            time.sleep(0.05)
        # Still serving: a fresh session completes a task and reports its identity back.
        with broker.connect() as fresh:
            page = fresh.open_page("After the chaos", record_id="Final")
            params = {"mode": "fast", "token": "final"}
            try:
                results = page.enqueue_background_task(CHAOS, params).result(timeout=30)
            except (PbtError, TimeoutError) as err:
                self.report.violations.append(f"a fresh session's task failed: {err!r}")
            else:
                expected = dict(params, ctx_task="1", ctx_session=str(fresh.id), ctx_record="Final")
                if results != expected:
                    self.report.violations.append(f"the final task returned {results}")
        self.counts["spawned"] = len(list(self.pids_dir.glob("*.[0-9]")))

    def check_rss(self) -> None:
        samples = self.report.rss_mb
        if len(samples) < 8:
            return
        first = samples[len(samples) // 8 : len(samples) // 2]
        second = samples[len(samples) // 2 :]
        before, after = statistics.median(first), statistics.median(second)
        if after > before * 1.5 + 20:
            self.report.violations.append(
                f"broker RSS grew: median {before:.1f} MB in the first half, {after:.1f} MB "
                f"in the second (max {max(samples):.1f} MB)"
            )

    def stop_broker(self) -> None:
        """Stop the broker under load: every handle still pending ends ServerShuttingDown."""
        assert self.broker is not None
        assert self.monitor is not None
        broker = self.broker
        self.monitor.close()
        self.monitor = None
        burst = broker.connect()
        handles: list[tuple[str, Any]] = []
        try:
            pages = [burst.open_page(f"Burst {n}", record_id=f"B{n}") for n in range(3)]
            modes = ["spawn_spin", "escape", "sleep", "spin", "fast", "spawn"]
            for n in range(24):
                mode = modes[n % len(modes)]
                params = {
                    "mode": mode,
                    "token": f"burst{n}",
                    "ms": "3000",
                    "pids": str(self.pids_dir),
                }
                task = pages[n % 3].enqueue_background_task(CHAOS, params, timeout=60_000)
                handles.append((mode, task))
            # Stop once the first tasks have their grandchildren (and an escapee) running.
            deadline = time.monotonic() + 10
            spawned = [self.pids_dir / "burst0.0", self.pids_dir / "burst1.1"]
            while not all(p.exists() for p in spawned) and time.monotonic() < deadline:
                time.sleep(0.02)
            with adopting_orphans() as adopted:
                try:
                    code = broker.stop()
                except AssertionError as err:
                    self.report.violations.append(f"stopping the broker: {err}")
                else:
                    if code != 0:
                        self.report.violations.append(f"the broker exited with {code}")
            if adopted:
                self.report.violations.append(
                    "the broker exited leaving children it had not reaped (they reparent to "
                    f"init, which may never reap them): {adopted[:20]}"
                )
            for mode, task in handles:
                try:
                    error = task.exception(timeout=10)
                except TimeoutError:
                    self.report.violations.append(f"burst task {task.id} ({mode}): no outcome")
                    continue
                outcome = classify(error, None if error else task.result(timeout=0))
                self.counts[f"burst:{outcome[0]}:{outcome[1]}"] += 1
                if outcome[:2] not in (("cancelled", "ServerShuttingDown"), ("completed", "")):
                    self.report.violations.append(
                        f"burst task {task.id} ({mode}) ended {outcome[:3]} when the broker "
                        "stopped; expected cancelled ServerShuttingDown"
                    )
        finally:
            burst.close()
        # An exception that escaped a handler is a bug even when nothing else noticed it.
        log = broker.log_text()
        for needle in ("Traceback", "Exception in callback", "InternalError", "CRITICAL"):
            if needle in log:
                at = log.index(needle)
                self.report.violations.append(
                    f"the broker log has {needle!r}: ...{log[max(0, at - 1500) : at + 2500]}"
                )
                break
        # Nothing it started may outlive it: workers, grandchildren, escapees.
        deadline = time.monotonic() + 10
        while (left := marked_processes(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            described = []
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    described.append((proc.pid, proc.name(), proc.status(), proc.ppid()))
                    proc.kill()
            self.report.violations.append(f"processes outlived the broker: {described[:20]}")
        for path in self.pids_dir.glob("*.[0-9]"):
            with contextlib.suppress(ValueError, OSError):
                pid, started = (int(x) for x in path.read_text().split())
                if alive(pid) and starttime(pid) == started:
                    self.report.violations.append(f"spawned process {pid} ({path.name}) lives on")

    def cleanup(self) -> None:
        for proc in self.ledger + self.victims:
            if proc.process.poll() is None:
                proc.process.kill()
            proc.process.wait()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.monitor is not None:
            self.monitor.close()
        if self.broker is not None:
            if self.report.violations:
                with contextlib.suppress(OSError):
                    shutil.copy(self.broker.log, self.run_dir / "broker.log")
                    shutil.copy(self.broker.directory / "stderr.txt", self.run_dir / "stderr.txt")
            self.broker.cleanup()
        for leftover in marked_processes(self.marker):
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        if self.report.violations:
            self.report.kept = self.run_dir
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run the chaos harness with ``config``; the report lists counts and violations."""
    report = ChaosReport(seed=config.seed)
    harness = Harness(config, report)
    started = time.monotonic()
    try:
        harness.run()
    finally:
        report.elapsed = time.monotonic() - started
        harness.cleanup()
    return report


def parse_args(argv: list[str]) -> ChaosConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few thousand tasks, for CI")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--tasks", type=int, help="accepted tasks to run (default 100000)")
    parser.add_argument("--sessions", type=int, help="concurrent ledger sessions")
    parser.add_argument("--clients", type=int, help="ledger client processes")
    parser.add_argument("--sync-clients", type=int, help="of which use the blocking client")
    parser.add_argument("--victims", type=int, help="client processes killed at random")
    parser.add_argument("--workers", type=int, help="broker worker processes")
    parser.add_argument("--max-tasks-per-worker", type=int, help="recycle workers (0: never)")
    parser.add_argument("--kill-interval", type=float, help="mean s between worker SIGKILLs")
    parser.add_argument("--stop-interval", type=float, help="mean s between worker SIGSTOPs")
    parser.add_argument("--log-level", help="the broker's LogLevel (default WARNING)")
    parser.add_argument(
        "--inject",
        choices=["drop", "duplicate", "misroute"],
        help="self-test: tamper with client-side events; the run must report violations",
    )
    parser.add_argument("--stall-timeout", type=float, help="s without progress = lost tasks")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress every 10 s")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 31)
    config = ChaosConfig.quick(seed) if args.quick else ChaosConfig(seed=seed)
    for name in (
        "tasks",
        "sessions",
        "clients",
        "sync_clients",
        "victims",
        "workers",
        "max_tasks_per_worker",
        "kill_interval",
        "stop_interval",
        "log_level",
        "inject",
        "stall_timeout",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.verbose = args.verbose
    config.clients = max(1, config.clients)
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(json.loads(argv[1]))
    config = parse_args(argv)
    print(
        f"chaos: seed {config.seed}, {config.tasks} tasks, {config.sessions} sessions in "
        f"{config.clients} clients, {config.workers} workers",
        flush=True,
    )
    report = run_chaos(config)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
