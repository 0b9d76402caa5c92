"""Load for the cluster scenarios: sessions that keep tasks in flight, and a ledger of outcomes.

A :class:`Driver` is one user: a session with a page that keeps ``in_flight`` tasks going,
one after another, and (if told to) opens a new session when its connection is lost, as an
application would. Every task the broker accepted goes into the :class:`Ledger` with what
its handle said and which triggers ran, so a scenario can check that each has exactly one
outcome. :func:`throughput` runs the same load in separate client processes, so that the
client's own CPU does not cap what the brokers can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pbt_server.client import aio, connect
from pbt_server.errors import (
    BackgroundTaskCanceled,
    BackgroundTaskError,
    ConnectionLost,
    PbtError,
)
from tests.cluster.codeunits import NOOP, WHOAMI
from tests.cluster.measure import CpuMeter, Groups
from tests.cluster.topology import AUTH_TOKEN

Address = tuple[str, int]
TaskKey = tuple[str, int, int]
"""(driver label, connection number, task id): task ids are unique within one session."""


@dataclass(frozen=True)
class Work:
    """What a driver enqueues, again and again."""

    codeunit: int
    parameters: dict[str, str] = field(default_factory=dict)
    timeout_ms: int = 10_000


@dataclass
class TaskRecord:
    outcomes: list[tuple[str, str, float]] = field(default_factory=list)
    """(kind, code, monotonic time) per outcome the handle reported: kind is ``completed``,
    ``error``, ``cancelled`` or ``lost`` (ConnectionLost)."""
    triggers: list[tuple[str, str]] = field(default_factory=list)
    """(kind, code) per trigger that ran."""
    accepted: bool = False
    text: str = ""


class Ledger:
    """Every accepted task and what became of it."""

    def __init__(self) -> None:
        self.tasks: dict[TaskKey, TaskRecord] = {}
        self.refused: Counter[str] = Counter()
        """Enqueues that raised (no task was accepted), by error code."""
        self.lost_connections: set[tuple[str, int]] = set()
        """(driver label, connection number) of the sessions whose connection was lost: their
        queued triggers never run, as the client's contract says."""

    def _record(self, key: TaskKey) -> TaskRecord:
        record = self.tasks.get(key)
        if record is None:
            record = self.tasks[key] = TaskRecord()
        return record

    def accept(self, key: TaskKey) -> None:
        self._record(key).accepted = True

    def settle(self, key: TaskKey, kind: str, code: str = "", text: str = "") -> None:
        record = self._record(key)
        record.outcomes.append((kind, code, time.monotonic()))
        record.text = record.text or text

    def trigger(self, key: TaskKey, kind: str, code: str = "") -> None:
        self._record(key).triggers.append((kind, code))

    def awaiting_triggers(self) -> int:
        """Tasks with an outcome whose trigger is still due (it runs on the dispatcher)."""
        return sum(
            1
            for key, record in self.tasks.items()
            if record.outcomes
            and record.outcomes[0][0] in ("completed", "error")
            and not record.triggers
            and key[:2] not in self.lost_connections
        )

    def problems(self) -> list[str]:
        """What breaks "every task has exactly one outcome"; empty when all is well."""
        found = []
        for key, record in self.tasks.items():
            if not record.accepted:
                found.append(f"{key}: a trigger ran for a task never accepted")
            if len(record.outcomes) != 1:
                found.append(f"{key}: {len(record.outcomes)} outcomes {record.outcomes}")
                continue
            kind, code, _ = record.outcomes[0]
            if len(record.triggers) > 1:
                found.append(f"{key}: {len(record.triggers)} triggers ran {record.triggers}")
            elif record.triggers and record.triggers[0] != (kind, code):
                found.append(f"{key}: trigger {record.triggers[0]} but handle {(kind, code)}")
            elif (
                kind in ("completed", "error")
                and not record.triggers
                and key[:2] not in self.lost_connections
            ):
                found.append(f"{key}: {kind} but no trigger ran")
            elif kind in ("lost", "cancelled") and record.triggers:
                found.append(f"{key}: {kind} yet a trigger ran {record.triggers}")
        return found

    def outcomes(self, where: Callable[[TaskKey], bool] = lambda key: True) -> Counter[str]:
        """Outcome counts (``completed``, ``lost``, ``error:<code>`` …) of the tasks ``where``
        picks."""
        counts: Counter[str] = Counter()
        for key, record in self.tasks.items():
            if where(key):
                for kind, code, _ in record.outcomes:
                    counts[f"{kind}:{code}" if code else kind] += 1
        return counts

    def texts(self, kind: str) -> Counter[str]:
        return Counter(
            record.text
            for record in self.tasks.values()
            for outcome, _, _ in record.outcomes
            if outcome == kind
        )


@dataclass
class Connection:
    """One session of a driver (a driver that reconnects has several, numbered from 0)."""

    number: int
    session: aio.Session
    page: aio.Page
    broker_pid: int
    opened_at: float
    lost_at: float | None = None
    first_completed_at: float | None = None
    completed: int = 0

    def lost(self, ledger: Ledger, label: str) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            ledger.lost_connections.add((label, self.number))


KEEPALIVE = 1.0
"""Seconds of silence before a client pings: a frozen broker is noticed within ~2-3 s."""


async def open_session(address: Address, seconds: float = 5.0) -> aio.Session:
    return await aio.connect(address, token=AUTH_TOKEN, timeout=seconds, keepalive=KEEPALIVE)


async def broker_of(session: aio.Session) -> int:
    """The pid of the broker running ``session`` (its worker's parent), asked on a page of
    its own: the triggers a page has when a task's outcome is dispatched are the ones run."""
    page = await session.open_page("Whoami")
    task = await page.enqueue_background_task(WHOAMI, timeout=5000)
    broker = int((await task.result())["broker_pid"])
    await page.close()
    return broker


class Driver:
    """One user keeping ``in_flight`` tasks of ``work`` going through ``address``."""

    def __init__(
        self,
        label: str,
        address: Address,
        ledger: Ledger,
        work: Work,
        *,
        in_flight: int = 1,
        reconnect: bool = False,
        pause_after_error: float = 0.0,
    ) -> None:
        self.label = label
        self.address = address
        self.ledger = ledger
        self.work = work
        self.in_flight = in_flight
        self.reconnect = reconnect
        self.pause_after_error = pause_after_error
        self.connections: list[Connection] = []
        self.connect_failures: Counter[str] = Counter()

    @property
    def current(self) -> Connection:
        return self.connections[-1]

    async def open(self) -> Connection:
        """Open a session and its page; learn which broker it landed on."""
        number = len(self.connections)
        session = await open_session(self.address)
        try:
            page = await session.open_page("Role Center", f"{self.label}/{number}")
            ledger, label = self.ledger, self.label

            def completed(task_id: int, results: dict[str, str]) -> None:
                ledger.trigger((label, number, task_id), "completed")

            def failed(task_id: int, code: str, text: str, stack: str) -> bool:
                ledger.trigger((label, number, task_id), "error", code)
                return True  # handled: the ledger has it; no notification

            broker = await broker_of(session)
            page.on_completed = completed
            page.on_error = failed
        except BaseException:
            await session.close()
            raise
        connection = Connection(number, session, page, broker, time.monotonic())
        self.connections.append(connection)
        return connection

    async def run(self, stop: asyncio.Event) -> None:
        """Keep tasks going until ``stop``; after a lost connection, reconnect if told to."""
        if not self.connections:
            await self.open()
        while not stop.is_set():
            connection = self.current
            await asyncio.gather(
                *(self._keep_going(connection, stop) for _ in range(self.in_flight))
            )
            if stop.is_set() or not self.reconnect:
                return
            while not stop.is_set():
                try:
                    await self.open()
                    break
                except PbtError as err:  # e.g. a balancer with no broker left to offer
                    self.connect_failures[err.code] += 1
                    await asyncio.sleep(0.02)

    async def _keep_going(self, connection: Connection, stop: asyncio.Event) -> None:
        page, work, ledger = connection.page, self.work, self.ledger
        while not stop.is_set() and connection.lost_at is None:
            try:
                task = await page.enqueue_background_task(
                    work.codeunit, work.parameters, timeout=work.timeout_ms
                )
            except ConnectionLost:
                ledger.refused["ConnectionLost"] += 1
                connection.lost(ledger, self.label)
                return
            except PbtError as err:
                ledger.refused[err.code] += 1
                await asyncio.sleep(0.01)
                continue
            key = (self.label, connection.number, task.id)
            ledger.accept(key)
            try:
                await task.result()
            except BackgroundTaskError as err:
                ledger.settle(key, "error", err.code, err.text)
                if self.pause_after_error:  # as an application would back off
                    await asyncio.sleep(self.pause_after_error)
            except BackgroundTaskCanceled as err:
                ledger.settle(key, "cancelled", err.code)
            except ConnectionLost as err:
                ledger.settle(key, "lost", "", err.text)
                connection.lost(ledger, self.label)
                return
            else:
                ledger.settle(key, "completed")
                connection.completed += 1
                if connection.first_completed_at is None:
                    connection.first_completed_at = time.monotonic()

    async def close(self) -> None:
        for connection in self.connections:
            await connection.session.close()


# --- throughput, in client processes of their own ------------------------------------------


@dataclass(frozen=True)
class ThroughputResult:
    tasks: int
    seconds: float
    errors: dict[str, int]
    cpu_seconds: dict[str, float]
    """CPU per part of the cluster over the measurement (:class:`CpuMeter`), ``clients``
    included."""

    @property
    def per_second(self) -> float:
        return self.tasks / self.seconds


def throughput(
    address: Address,
    *,
    processes: int = 2,
    sessions: int = 4,
    in_flight: int = 8,
    seconds: float = 3.0,
    work: Work | None = None,
    groups: Groups = dict,
) -> ThroughputResult:
    """Tasks completed per second by ``processes`` x ``sessions`` sessions, each keeping
    ``in_flight`` tasks going, counted over ``seconds`` from a common start; the CPU each of
    ``groups`` used meanwhile."""
    context = multiprocessing.get_context("spawn")  # no threads or loops inherited
    barrier = context.Barrier(processes + 1)
    results: multiprocessing.Queue[tuple[int, dict[str, int], float] | str] = context.Queue()
    children = [
        context.Process(
            target=_client_process,
            args=(address, sessions, in_flight, seconds, work or Work(NOOP), barrier, results),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        barrier.wait(timeout=60)  # every client connected: go
        meter = CpuMeter(groups)
        answers = [results.get(timeout=seconds + 60) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join()
    failures = [answer for answer in answers if isinstance(answer, str)]
    if failures:
        raise AssertionError(f"a client process failed: {failures[0]}")
    tasks, errors, client_cpu = 0, Counter[str](), 0.0
    for answer in answers:
        assert not isinstance(answer, str)
        tasks += answer[0]
        errors.update(answer[1])
        client_cpu += answer[2]
    return ThroughputResult(tasks, seconds, dict(errors), meter.stop(clients=client_cpu))


def _client_process(
    address: Address,
    sessions: int,
    in_flight: int,
    seconds: float,
    work: Work,
    barrier: Any,
    results: Any,
) -> None:
    try:
        results.put(asyncio.run(_client_load(address, sessions, in_flight, seconds, work, barrier)))
    except BaseException as err:
        results.put(f"{type(err).__name__}: {err}")
        with contextlib.suppress(Exception):
            barrier.abort()


async def _client_load(
    address: Address, sessions: int, in_flight: int, seconds: float, work: Work, barrier: Any
) -> tuple[int, dict[str, int], float]:
    opened = [await open_session(address) for _ in range(sessions)]
    try:
        pages = [await session.open_page("Throughput") for session in opened]
        await asyncio.to_thread(barrier.wait, 60)
        cpu_start = time.process_time()
        end = time.monotonic() + seconds
        done = 0
        errors: Counter[str] = Counter()

        async def keep_going(page: aio.Page) -> None:
            nonlocal done
            while time.monotonic() < end:
                task = await page.enqueue_background_task(
                    work.codeunit, work.parameters, timeout=work.timeout_ms
                )
                try:
                    await task.result()
                except PbtError as err:
                    errors[err.code] += 1
                    continue
                if time.monotonic() <= end:
                    done += 1

        await asyncio.gather(*(keep_going(page) for page in pages for _ in range(in_flight)))
        return done, dict(errors), time.process_time() - cpu_start
    finally:
        for session in opened:
            await session.close()


# --- round trips, one session at a time (the blocking client) -------------------------------


@dataclass
class RoundTrips:
    """Seconds per sequential task (enqueue -> result) and per ping, and the tasks' results."""

    task: list[float] = field(default_factory=list)
    ping: list[float] = field(default_factory=list)
    results: list[dict[str, str]] = field(default_factory=list)


def round_trips(
    address: Address, count: int = 300, warmup: int = 30, work: Work | None = None
) -> RoundTrips:
    """One session, one task at a time (the blocking client), each followed by a ping."""
    work = work or Work(NOOP)
    measured = RoundTrips()
    with connect(address, token=AUTH_TOKEN) as session:
        page = session.open_page("Round trip")
        for _ in range(warmup):
            page.enqueue_background_task(work.codeunit, work.parameters).result(timeout=10)
            session.ping()
        for _ in range(count):
            started = time.perf_counter()
            task = page.enqueue_background_task(work.codeunit, work.parameters)
            measured.results.append(task.result(timeout=10))
            measured.task.append(time.perf_counter() - started)
            started = time.perf_counter()
            session.ping()
            measured.ping.append(time.perf_counter() - started)
    return measured
