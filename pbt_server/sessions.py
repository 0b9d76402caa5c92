"""Parent sessions, pages and tasks: the broker's bookkeeping, pure and synchronous.

No processes, sockets or timers here (pebble's rule: bookkeeping apart from effects), so
every decision is testable with plain objects and an injected clock.

Scheduling:

- a session runs at most ``max_concurrency`` tasks at once; the rest wait FIFO;
- ``max_queue_length`` counts *waiting* tasks only; one more fails with QueueFull;
- free workers go to sessions round-robin: each session that can start a task is in a ring
  once; ``next_task`` takes one task from the session at the head and puts the session at
  the back. Sessions with nothing running have their own ring, served first: a session with
  100 waiting tasks cannot make another session's single task wait behind it, so that task
  waits at most for the next worker to come free (about one task's run time).

Cancelling a waiting task only marks it (O(1)); ``next_task`` skips marked tasks when it
reaches them, so neither enqueue nor cancel depends on how many tasks wait.

Shared executions (``@codeunit(..., shared=True)``). The page's task is ATTACHED to an
*execution*: a task of its own in the scheduler's shared session (id 0, never listed), which
the pool runs like any task. Identical tasks (same codeunit and parameters, and context for
``per_context``) attach to the execution that waits or runs. Each attached task keeps its
id, page, record and cancellation; it holds no worker, so its session counts it among its
waiting tasks (``ChildSessionsMaxQueueLength``) and never against its concurrency. The
execution's timeout is its first task's. When it ends, every attached task ends the same
way (:meth:`Scheduler.end_execution`); when the last attached task is cancelled, so is the
execution (:meth:`Scheduler.take_abandoned`: the broker kills its worker if it runs). After a
reload no new task attaches to an execution already handed to a worker (it runs the old
code: :meth:`Scheduler.renew_executions`).

Task states (every move happens in one method, named in a comment)::

    WAITING --next_task--> STARTING --started--> RUNNING --finish--> COMPLETED | FAILED
       ^                      |    |
       +---worker_lost--------+    +--finish--> COMPLETED | FAILED
       |   (never taken; once)
       +-------- cancel / set_record / close_page / close_session ----> CANCELLED
                 (from WAITING, STARTING or RUNNING)

    ATTACHED --end_execution--> COMPLETED | FAILED;  --cancel...--> CANCELLED

STARTING is a task handed to a worker, not (yet) found taken off its pipe. Most tasks end
without anyone looking (``finish`` from STARTING): only a deadline check, the worker's death
or a protocol fault asks whether the worker had taken it.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from pbt_server.budget import Budget, map_size, page_size
from pbt_server.cache import ResultCache
from pbt_server.codeunits import Sharing
from pbt_server.config import AsyncProcessingSection
from pbt_server.errors import (
    CancelReason,
    InvalidParameters,
    MemoryBudgetExceeded,
    PageClosed,
    PageNotFound,
    QueueFull,
    TooManyPages,
    UnknownCodeunit,
)
from pbt_server.protocol import MAX_PARAMETERS, ErrorLevel


class TaskState(enum.Enum):
    WAITING = "waiting"
    STARTING = "starting"  # handed to a worker; not yet found taken off its pipe
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ATTACHED = "attached"  # a page's task waiting for a shared execution's outcome

    @property
    def active(self) -> bool:
        return self in _ACTIVE


_ACTIVE = frozenset({TaskState.WAITING, TaskState.STARTING, TaskState.RUNNING, TaskState.ATTACHED})
SHARED_SESSION: Final = 0  # the id of the session that owns shared executions
MAX_PAGES = 1024  # open pages per session: a real client has a few dozen; memory is bounded
_LEVELS = frozenset(ErrorLevel)


@dataclass(eq=False, slots=True)
class Task:
    session: Session
    page: Page
    id: int
    job: int  # unique over the broker's life; names the task on worker pipes
    codeunit: int
    parameters: dict[str, str]
    timeout_ms: int
    level: str
    record: str
    enqueued_at: float
    state: TaskState = TaskState.WAITING
    size: int = 0  # its share of the memory budget while it is active
    started_at: float | None = None
    cancel_reason: str = ""
    requeued: bool = False  # put back once after its worker died before starting it
    context: dict[str, str] | None = None  # an execution's own; None: its session's
    execution: Task | None = None  # an attached task's shared execution
    attached: list[Task] | None = None  # a shared execution's attached tasks
    key: tuple[object, ...] | None = None  # what makes tasks identical to an execution
    cacheable: bool = False  # an execution whose results the cache keeps
    version: object = None  # the data version read when it was handed to a worker

    def __repr__(self) -> str:
        return f"<Task s{self.session.id}/t{self.id} job={self.job} {self.state.value}>"


@dataclass(eq=False, slots=True)
class Page:
    id: int
    name: str
    record: str
    closed: bool = False
    tasks: dict[int, Task] = field(default_factory=dict)  # active tasks only
    size: int = 0  # its share of the memory budget while it is open


@dataclass(eq=False, slots=True)
class Session:
    id: int
    context: dict[str, str] = field(default_factory=dict)  # copied into every task's ctx
    pages: dict[int, Page] = field(default_factory=dict)
    tasks: dict[int, Task] = field(default_factory=dict)  # active tasks only
    queue: deque[Task] = field(
        default_factory=deque
    )  # WAITING, plus cancelled ones not yet skipped
    waiting: int = 0
    running: int = 0  # STARTING + RUNNING
    last_task_id: int = 0
    last_page_id: int = 0
    closed: bool = False
    in_ready: bool = False
    size: int = 0  # its context's share of the memory budget
    unlimited: bool = False  # the shared session: as many running as there are workers


class Scheduler:
    """All sessions of one broker, and the decisions about their tasks."""

    def __init__(
        self,
        limits: AsyncProcessingSection,
        codeunits: Container[int],
        *,
        clock: Callable[[], float] = time.monotonic,
        budget: Budget | None = None,
        sharing: Mapping[int, Sharing] | None = None,
    ) -> None:
        self.limits = limits
        self.codeunits = codeunits
        self.sharing: Mapping[int, Sharing] = sharing or {}  # the shared codeunits
        self.shared = Session(SHARED_SESSION, unlimited=True)
        self._shared_page = Page(0, "(shared executions)", "")
        self._executions: dict[tuple[object, ...], Task] = {}  # waiting or running, by key
        self._abandoned: list[Task] = []  # executions whose last task was cancelled
        self.cache: ResultCache | None = None
        self._served: list[tuple[Task, dict[str, str]]] = []  # cache hits to complete
        self.attaches = 0  # tasks that attached to an execution another task started
        self.clock = clock
        self.budget = budget
        self.sessions: dict[int, Session] = {}
        self._ready: deque[Session] = deque()  # sessions with a task running
        self._fresh: deque[Session] = deque()  # sessions with none: they go first
        self._last_session_id = 0
        self._last_job = 0

    # --- sessions and pages ---------------------------------------------------------------

    def open_session(self, context: dict[str, str] | None = None) -> Session:
        """A new parent session.

        Raises:
            MemoryBudgetExceeded: its context does not fit in the memory budget.
        """
        copied = dict(context or {})
        size = self._take(map_size(copied), "a session's context")
        self._last_session_id += 1
        session = Session(self._last_session_id, copied, size=size)
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> list[Task]:
        """End the session; return its active tasks, now cancelled."""
        session.closed = True
        self.sessions.pop(session.id, None)
        cancelled = self._cancel_all(list(session.tasks.values()), CancelReason.SESSION_CLOSED)
        session.queue.clear()
        for page in session.pages.values():
            page.closed = True
            self._give(page.size)
        self._give(session.size)
        return cancelled

    def open_page(self, session: Session, name: str, record: str) -> Page:
        if len(session.pages) >= MAX_PAGES:
            raise TooManyPages(f"session {session.id} already has {MAX_PAGES} pages open")
        size = self._take(page_size(name, record), "a page")
        session.last_page_id += 1
        page = Page(session.last_page_id, name, record, size=size)
        session.pages[page.id] = page
        return page

    def set_record(self, session: Session, page_id: int, record: str) -> list[Task]:
        """Move the page to ``record``; tasks enqueued under another record are cancelled."""
        page = self._page(session, page_id)
        if page.closed:
            raise PageClosed(f"page {page_id} is closed")
        size = page_size(page.name, record)
        if self.budget is not None:
            # Never refused (the client has moved already): a longer record id may take the
            # budget over its limit, and the next page or task is refused instead.
            self.budget.used += size - page.size
        page.size = size
        page.record = record
        stale = [task for task in page.tasks.values() if task.record != record]
        return self._cancel_all(stale, CancelReason.RECORD_CHANGED)

    def close_page(self, session: Session, page_id: int) -> list[Task]:
        page = self._page(session, page_id)
        if page.closed:
            return []
        page.closed = True
        del session.pages[page_id]
        self._give(page.size)
        return self._cancel_all(list(page.tasks.values()), CancelReason.PAGE_CLOSED)

    def _page(self, session: Session, page_id: int) -> Page:
        page = session.pages.get(page_id)
        if page is None:
            if 0 < page_id <= session.last_page_id:
                raise PageClosed(f"page {page_id} is closed")
            raise PageNotFound(f"session {session.id} has no page {page_id}")
        return page

    # --- tasks ----------------------------------------------------------------------------

    def effective_timeout(self, timeout_ms: int | None) -> int:
        """None or <= 0 -> the default; above the maximum -> the maximum."""
        if timeout_ms is None or timeout_ms <= 0:
            return self.limits.default_timeout_ms
        return min(timeout_ms, self.limits.max_timeout_ms)

    def enqueue(
        self,
        session: Session,
        page_id: int,
        codeunit: int,
        parameters: object,
        timeout_ms: int | None,
        level: str,
    ) -> Task:
        """Accept a task, or raise the EnqueueError that says why not."""
        page = self._page(session, page_id)
        if page.closed:
            raise PageClosed(f"page {page_id} is closed")
        if codeunit not in self.codeunits:
            raise UnknownCodeunit(f"codeunit {codeunit} is not registered")
        checked = _check_parameters(parameters)
        if level not in _LEVELS:
            raise InvalidParameters(f"error level {level!r:.40} is not one of {sorted(_LEVELS)}")
        limit = self.limits.max_queue_length
        if session.waiting >= limit:
            raise QueueFull(
                f"session {session.id} already has {session.waiting} tasks waiting "
                f"(ChildSessionsMaxQueueLength = {limit})"
            )
        size = self._take(map_size(checked), "a waiting task")
        sharing = self.sharing.get(codeunit)
        if sharing is not None:
            return self._attach(session, page, codeunit, checked, timeout_ms, level, size, sharing)
        session.last_task_id += 1
        self._last_job += 1
        task = Task(
            session=session,
            page=page,
            id=session.last_task_id,
            job=self._last_job,
            codeunit=codeunit,
            parameters=checked,
            timeout_ms=self.effective_timeout(timeout_ms),
            level=level,
            record=page.record,
            enqueued_at=self.clock(),
            size=size,
        )
        session.tasks[task.id] = task
        page.tasks[task.id] = task
        session.queue.append(task)  # -> WAITING
        session.waiting += 1
        self._mark_ready(session)
        return task

    def _attach(
        self,
        session: Session,
        page: Page,
        codeunit: int,
        parameters: dict[str, str],
        timeout_ms: int | None,
        level: str,
        size: int,
        sharing: Sharing,
    ) -> Task:
        """A task of a shared codeunit: attached to the identical execution, or a new one."""
        context = dict(session.context) if sharing.per_context else {}
        key = (codeunit, tuple(sorted(parameters.items())), tuple(sorted(context.items())))
        now = self.clock()
        session.last_task_id += 1
        task = Task(
            session=session,
            page=page,
            id=session.last_task_id,
            job=0,  # never runs: its execution does
            codeunit=codeunit,
            parameters=parameters,
            timeout_ms=self.effective_timeout(timeout_ms),
            level=level,
            record=page.record,
            enqueued_at=now,
            state=TaskState.ATTACHED,
            size=size,
        )
        execution = self._executions.get(key)
        cache = self.cache
        if execution is None and sharing.cache and cache is not None and cache.enabled:
            results = cache.get(key, now, sharing.max_age)
            if results is not None:
                task.started_at = now
                session.tasks[task.id] = task
                page.tasks[task.id] = task
                session.waiting += 1
                self._served.append((task, results))  # completed on the next turn
                return task
        if execution is None:
            execution = self._new_execution(task, context, key)
            execution.cacheable = sharing.cache and cache is not None and cache.enabled
        else:
            self.attaches += 1
            if execution.started_at is not None:
                task.started_at = now  # it waited for nothing
        assert execution.attached is not None
        execution.attached.append(task)
        task.execution = execution
        session.tasks[task.id] = task
        page.tasks[task.id] = task
        session.waiting += 1  # counted as waiting: it holds no worker of its own
        return task

    def _new_execution(self, first: Task, context: dict[str, str], key: tuple[object, ...]) -> Task:
        shared = self.shared
        shared.last_task_id += 1
        self._last_job += 1
        execution = Task(
            session=shared,
            page=self._shared_page,
            id=shared.last_task_id,
            job=self._last_job,
            codeunit=first.codeunit,
            parameters=first.parameters,
            timeout_ms=first.timeout_ms,  # the first task's: later ones join it as it is
            level="Error",
            record="",
            enqueued_at=first.enqueued_at,
            context=context,
            attached=[],
            key=key,
        )
        self._executions[key] = execution
        shared.tasks[execution.id] = execution
        self._shared_page.tasks[execution.id] = execution
        shared.queue.append(execution)  # -> WAITING
        shared.waiting += 1
        self._mark_ready(shared)
        return execution

    def end_execution(self, execution: Task, state: TaskState) -> list[Task]:
        """A shared execution ended (COMPLETED or FAILED); its attached tasks end the same
        way. Returns them, for their pages to be told."""
        self.finish(execution, state)
        assert execution.attached is not None
        attached, execution.attached = execution.attached, []
        for task in attached:
            task.state = state  # ATTACHED -> COMPLETED | FAILED
            task.session.waiting -= 1
            self._forget(task)
        return attached

    def renew_executions(self) -> None:
        """A reload: an execution already handed to a worker runs the old code, so no task
        enqueued from now on attaches to it and its results are not cached; a waiting one
        will run the new code and stays open to identical tasks."""
        for key, execution in list(self._executions.items()):
            if execution.state is not TaskState.WAITING:
                del self._executions[key]
                execution.key = None
                execution.cacheable = False

    def take_served(self) -> list[tuple[Task, dict[str, str]]]:
        """The tasks answered from the cache since the last call, with their results."""
        served, self._served = self._served, []
        return served

    def serve(self, task: Task) -> bool:
        """Complete a task answered from the cache; False if it was cancelled meanwhile."""
        if task.state is not TaskState.ATTACHED:
            return False
        task.state = TaskState.COMPLETED  # ATTACHED -> COMPLETED
        task.session.waiting -= 1
        self._forget(task)
        return True

    def take_abandoned(self) -> list[Task]:
        """Executions cancelled since the last call because nobody waits for them now."""
        abandoned, self._abandoned = self._abandoned, []
        return abandoned

    def cancel(self, session: Session, task_id: int) -> Task | None:
        """Cancel one active task by id; None for unknown or finished ids (never raises)."""
        task = session.tasks.get(task_id)
        if task is None:
            return None
        self._cancel(task, CancelReason.CANCELED)
        return task

    def next_task(self) -> Task | None:
        """The next task to hand to a free worker, fairly across sessions; it is now
        STARTING, and its clock runs from now (``started_at``)."""
        while self._fresh or self._ready:
            session = (self._fresh or self._ready).popleft()
            session.in_ready = False
            task = self._pop_waiting(session)
            if task is None:
                continue
            task.state = TaskState.STARTING  # WAITING -> STARTING
            task.started_at = self.clock()
            for attached in task.attached or ():
                attached.started_at = task.started_at
            session.waiting -= 1
            session.running += 1
            self._mark_ready(session)
            return task
        return None

    def started(self, task: Task, at: float | None = None) -> None:
        """The task's worker was found to have taken it: it runs. ``at``: it was taken late
        (not by its first deadline check), so its clock starts there instead."""
        assert task.state is TaskState.STARTING, task
        task.state = TaskState.RUNNING  # STARTING -> RUNNING
        if at is not None:
            task.started_at = at
            for attached in task.attached or ():
                attached.started_at = at

    def worker_lost(self, task: Task) -> bool:
        """The worker a task was handed to died (or was killed for not taking it).

        A task its worker had not taken off its pipe (still STARTING: the caller marks a
        taken one :meth:`started` first) never started: it goes back to the head of its
        queue to run elsewhere — once; True. A task that had started, or was put back
        before, is the caller's to fail; False.
        """
        if task.state is not TaskState.STARTING or task.requeued:
            return False
        task.state = TaskState.WAITING  # STARTING -> WAITING
        task.requeued = True
        task.started_at = None  # it waits again; its next hand-over starts its clock
        for attached in task.attached or ():
            attached.started_at = None
        session = task.session
        session.running -= 1
        session.waiting += 1
        session.queue.appendleft(task)
        self._mark_ready(session)
        return True

    def finish(self, task: Task, state: TaskState) -> None:
        """The task ended in the worker (COMPLETED) or failed (FAILED: error, timeout, crash)."""
        assert state in (TaskState.COMPLETED, TaskState.FAILED), state
        assert task.state in (TaskState.STARTING, TaskState.RUNNING), task
        task.state = state  # STARTING | RUNNING -> COMPLETED | FAILED
        if task.key is not None:
            del self._executions[task.key]
        self._forget(task)
        task.session.running -= 1
        self._mark_ready(task.session)

    def active_tasks(self) -> Iterator[Task]:
        for session in self.sessions.values():
            yield from session.tasks.values()

    def _cancel_all(self, tasks: list[Task], reason: str) -> list[Task]:
        for task in tasks:
            self._cancel(task, reason)
        return tasks

    def _cancel(self, task: Task, reason: str) -> None:
        session = task.session
        if task.state is TaskState.ATTACHED:
            session.waiting -= 1
            task.state = TaskState.CANCELLED  # ATTACHED -> CANCELLED
            task.cancel_reason = reason
            self._forget(task)
            self._detach(task)
            return
        if task.key is not None:
            del self._executions[task.key]
        if task.state is TaskState.WAITING:
            session.waiting -= 1  # stays in the queue, skipped by _pop_waiting
            if len(session.queue) > 2 * session.waiting + 64:
                # Enqueue-and-cancel loops on a saturated session would otherwise grow the
                # queue without bound; compacting here keeps cancel amortised O(1).
                session.queue = deque(t for t in session.queue if t.state is TaskState.WAITING)
        else:
            session.running -= 1
        task.state = TaskState.CANCELLED  # WAITING | STARTING | RUNNING -> CANCELLED
        task.cancel_reason = reason
        self._forget(task)
        self._mark_ready(session)

    def _detach(self, task: Task) -> None:
        """An attached task went; an execution nobody waits for any more goes too."""
        execution = task.execution
        if execution is None:
            return  # answered from the cache: it had no execution
        assert execution.attached is not None
        execution.attached.remove(task)
        if not execution.attached and execution.state.active:
            self._cancel(execution, task.cancel_reason)
            self._abandoned.append(execution)

    def _forget(self, task: Task) -> None:
        del task.session.tasks[task.id]
        del task.page.tasks[task.id]
        self._give(task.size)

    def _take(self, size: int, what: str) -> int:
        """Reserve ``size`` bytes for ``what``; return ``size``.

        Raises:
            MemoryBudgetExceeded: the budget has no room for it.
        """
        budget = self.budget
        if budget is not None and not budget.take(size):
            raise MemoryBudgetExceeded(
                f"the server's memory budget is spent ({budget.used} of {budget.limit} bytes,"
                f" MaxBufferedMB): no room for {what}; try again when tasks have ended"
            )
        return size

    def _give(self, size: int) -> None:
        if self.budget is not None:
            self.budget.give(size)

    def _pop_waiting(self, session: Session) -> Task | None:
        queue = session.queue
        while queue:
            task = queue.popleft()
            if task.state is TaskState.WAITING:
                return task
        return None

    def _mark_ready(self, session: Session) -> None:
        if (
            not session.in_ready
            and not session.closed
            and session.waiting > 0
            and (session.running < self.limits.max_concurrency or session.unlimited)
        ):
            session.in_ready = True
            (self._ready if session.running else self._fresh).append(session)


def _check_parameters(parameters: object) -> dict[str, str]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidParameters(
            f"parameters must be a map of text to text, not {type(parameters).__name__}"
        )
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidParameters(f"{len(parameters)} parameters; at most {MAX_PARAMETERS}")
    for key, value in parameters.items():
        if type(key) is not str or type(value) is not str:
            raise InvalidParameters(
                f"parameter {key!r:.60} = {type(value).__name__}: keys and values must be text"
            )
    return parameters
