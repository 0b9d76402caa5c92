"""What the broker counts for its operators: task outcomes, wait and run times, worker ends.

The broker owns one :class:`Telemetry` when ``[Server] MetricsAddress`` is set (and none
otherwise: its hooks then cost one attribute check). Two hooks feed it, both on the event
loop and both a few dict and list operations, no lock, no I/O:

- :meth:`Telemetry.task_ended`, once per task, with the outcome event the broker sends
  (``completed``, ``failed`` or ``cancelled``: every task ends exactly once, so the counts
  add up to the tasks accepted);
- :meth:`Telemetry.worker_ended`, once per worker incarnation the pool ends or loses, with
  its cause.

Nothing is rendered here. :meth:`Telemetry.snapshot` copies the counts, also on the loop,
into a :class:`Counters` that the HTTP server's threads turn into Prometheus text or the
dashboard's JSON (``metrics.py``), so a scrape costs the loop one copy and nothing more.

Times are the loop's clock (monotonic seconds). A task's *wait* is from its enqueue to its
hand-over to a worker; its *run*, from that hand-over to its outcome. A task cancelled
before it was handed to a worker has no wait or run; one cancelled while running has a
wait but no run (the user cut it short: it says nothing about the codeunit).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pbt_server.sessions import Task

# Upper bounds (seconds) of the wait and run histograms: a no-op runs in ~0.1 ms, the
# longest timeout allowed is 10 minutes.
BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
OUTCOMES: Final = ("completed", "error", "cancelled")
OUTCOME_OF: Final[Mapping[str, str]] = {
    "completed": "completed",
    "failed": "error",
    "cancelled": "cancelled",
}
# Why a worker ended: killed by the broker (timeout, cancel, memory, no_ack, protocol),
# retired after its task (recycle: MaxTasksPerWorker; leftovers: the task left a thread, a
# process or a changed setting behind; reload: it ran the code or settings a reload
# replaced, or its slot went with a smaller Workers.Count), or lost (crash: it died by
# itself; boot_failure: it died before it was ready). A server that is stopping counts none.
KILL_CAUSES: Final = (
    "timeout",
    "cancel",
    "memory",
    "no_ack",
    "protocol",
    "crash",
    "recycle",
    "leftovers",
    "reload",
    "boot_failure",
)
HISTORY_SECONDS: Final = 600  # per-second outcome counts kept for the dashboard
RECENT_TASKS: Final = 4096  # the latest tasks' times, for the dashboard's percentiles
MAX_SERIES: Final = 1000  # (outcome, code, codeunit) kept apart; more share code "(other)"
OTHER_CODE: Final = "(other)"

OutcomeKey = tuple[str, str, int]  # outcome, code ("" for completed), codeunit
SecondKey = tuple[str, str]  # outcome, code


@dataclass(slots=True)
class Histogram:
    """Counts per bucket of :data:`BUCKETS` (the last one is +Inf, not cumulative), sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        return Histogram(self.counts.copy(), self.total)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Counts of values <= each bound, the last one (+Inf) being every value."""
        running, out = 0, []
        for n in self.counts:
            running += n
            out.append(running)
        return out


@dataclass(slots=True)
class Timings:
    """One codeunit's wait and run histograms."""

    wait: Histogram = field(default_factory=Histogram)
    run: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True, slots=True)
class Counters:
    """A copy of the counts, taken on the loop; safe to read in any thread."""

    now: float  # the loop clock when it was taken
    outcomes: dict[OutcomeKey, int]
    timings: dict[int, Timings]
    kills: dict[str, int]
    # Per second (the loop clock's whole seconds), the outcomes that ended in it; the
    # current second included. Empty unless asked for.
    seconds: list[tuple[int, dict[SecondKey, int]]]
    # The latest tasks that started: (ended at, codeunit, wait, run or None if cancelled).
    recent: list[tuple[float, int, float, float | None]]


class Telemetry:
    """The broker's counts of task outcomes, task times and worker ends (loop side)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.outcomes: dict[OutcomeKey, int] = {}
        self.timings: dict[int, Timings] = {}
        self.kills: dict[str, int] = dict.fromkeys(KILL_CAUSES, 0)
        self.recent: deque[tuple[float, int, float, float | None]] = deque(maxlen=RECENT_TASKS)
        self._seconds: deque[tuple[int, dict[SecondKey, int]]] = deque(maxlen=HISTORY_SECONDS)
        self._second = -1
        self._this_second: dict[SecondKey, int] = {}

    def task_ended(self, task: Task, event: Mapping[str, object]) -> None:
        """The broker sends ``event`` (``completed`` / ``failed`` / ``cancelled``) for
        ``task``, its one outcome."""
        now = self.clock()
        outcome = OUTCOME_OF[str(event["op"])]
        code = str(event.get("code", ""))
        key = (outcome, code, task.codeunit)
        outcomes = self.outcomes
        count = outcomes.get(key)
        if count is None and len(outcomes) >= MAX_SERIES:
            # A codeunit that makes up error codes must not grow the scrape without bound.
            key = (outcome, OTHER_CODE, task.codeunit)
            count = outcomes.get(key)
        outcomes[key] = (count or 0) + 1
        second = int(now)
        if second != self._second:
            self._roll(second)
        per_second = self._this_second
        brief = (outcome, key[1])
        per_second[brief] = per_second.get(brief, 0) + 1
        started = task.started_at
        if started is None:
            return  # never started: no wait, no run
        timings = self.timings.get(task.codeunit)
        if timings is None:
            timings = self.timings[task.codeunit] = Timings()
        wait = started - task.enqueued_at
        timings.wait.observe(wait)
        if outcome == "cancelled":
            self.recent.append((now, task.codeunit, wait, None))
        else:
            run = now - started
            timings.run.observe(run)
            self.recent.append((now, task.codeunit, wait, run))

    def worker_ended(self, cause: str) -> None:
        """The pool ended (or lost) a worker for ``cause`` (one of :data:`KILL_CAUSES`)."""
        self.kills[cause] = self.kills.get(cause, 0) + 1

    def _roll(self, second: int) -> None:
        if self._this_second:
            self._seconds.append((self._second, self._this_second))
            self._this_second = {}
        self._second = second

    def snapshot(self, *, history: bool = False) -> Counters:
        """Copy the counts (on the loop); ``history`` adds the per-second outcomes and the
        latest tasks' times (what the dashboard shows)."""
        seconds: list[tuple[int, dict[SecondKey, int]]] = []
        recent: list[tuple[float, int, float, float | None]] = []
        if history:
            seconds = [(s, dict(counts)) for s, counts in self._seconds]
            if self._this_second:
                seconds.append((self._second, dict(self._this_second)))
            recent = list(self.recent)
        return Counters(
            now=self.clock(),
            outcomes=dict(self.outcomes),
            timings={c: Timings(t.wait.copy(), t.run.copy()) for c, t in self.timings.items()},
            kills=dict(self.kills),
            seconds=seconds,
            recent=recent,
        )
