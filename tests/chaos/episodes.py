"""The episode driver: one session's life of enqueues, cancels, record changes and endings.

The driver is written once, as a coroutine, over a small :class:`Flavour` adapter:

- :class:`AioFlavour` awaits the asyncio client (``pbt_server.client.aio``);
- :class:`BlockingFlavour` calls the blocking client (``pbt_server.client``) directly, so
  none of its coroutines ever suspends, and :func:`run_blocking` runs an episode to its end
  with one ``send(None)``, on the lane's own thread.

What the flavours differ in is the adapter's few lines: how to call, wait, sleep and break
the connection, whether the ledger's checks may assume one thread (``strict``), and whether
an episode may iterate ``task.progress_updates()`` beside its other work (asyncio only).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, Protocol, TypeVar

from pbt_server import client as blocking
from pbt_server.client import aio
from pbt_server.errors import CancelReason, ConnectionLost, EnqueueError, PbtError
from tests.chaos.ledger import (
    TIMING_OUT,
    IterRec,
    Ledger,
    Outcome,
    PageRec,
    TaskRec,
    classify,
)
from tests.chaos_codeunits import CHAOS, SHARED_CODEUNITS

T = TypeVar("T")

# Modes of the Chaos codeunit and how often each is picked.
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
    "progress": 3.0,
}
# The shared codeunits (CHAOS_SHARED, CHAOS_PER_CONTEXT, CHAOS_CACHED): their modes, and a
# few parameter sets (``key``) each, so that tasks of many sessions are identical.
P_SHARED: Final = 0.3  # of a ledger session's tasks
SHARED_MODE_WEIGHTS: Final = {
    "fast": 30.0,
    "sleep": 30.0,
    "progress": 25.0,
    "raise": 10.0,
    "spin": 1.0,
    "exit": 1.5,
}
SHARED_KEYS: Final = {1: 45.0, 2: 45.0, 3: 10.0}  # key -> weight
LONG_SLEEP_MS: Final = 300  # shared sleep of key 3: often still running when a reload is done
USERS: Final = ("u1", "u2")  # the sessions' contexts (what per_context executions tell apart)
P_WATCH_PROGRESS: Final = 0.85  # of pages: with on_progress
P_ITERATE: Final = 0.4  # of progress tasks (asyncio): also iterate progress_updates()
ITERATIONS_END: Final = 10.0  # seconds the session's end waits for its iterations
NORMAL_TIMEOUT_MS: Final = 2000
SPIN_TIMEOUT_MS: Final = (50, 200)
LEVELS: Final = ("Ignore", "Warning", "Error")

# Per enqueue of a ledger session: the chance of each other action first.
P_CANCEL: Final = 0.03
P_RACE_CANCEL: Final = 0.03  # cancel the task just enqueued, racing its completion
P_SET_RECORD: Final = 0.012
P_CLOSE_PAGE: Final = 0.006
ENDINGS: Final = (("natural", 0.7), ("close", 0.15), ("abort", 0.15))
PROGRESS_WAIT: Final = 1.0  # seconds; a wake-up that missed its outcome sweeps again then


class Event(Protocol):
    def set(self) -> None: ...
    def clear(self) -> None: ...


class Flavour(Protocol):
    """What the driver needs from a client flavour."""

    strict: bool  # one thread: local state changes are atomic with the client's
    windows: tuple[int, ...]  # tasks in flight an episode may keep
    race_delays: tuple[float, ...]  # seconds between an enqueue and its racing cancel
    iterates: bool  # may run progress_updates() iterations beside the episode

    async def connect(self, address: str, context: Mapping[str, str]) -> Any: ...
    async def call(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...
    def event(self) -> Event: ...
    async def wait(self, event: Event, seconds: float) -> None: ...
    async def sleep(self, seconds: float) -> None: ...
    async def break_connection(self, session: Any) -> None: ...
    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> Any: ...
    async def join(self, spawned: list[Any], seconds: float) -> None: ...


class AioFlavour:
    strict: bool = True
    windows: tuple[int, ...] = (1, 3, 8, 20, 30, 40, 80)
    race_delays: tuple[float, ...] = (0.0, 0.0, 0.001, 0.003, 0.01, 0.03)
    iterates: bool = True

    async def connect(self, address: str, context: Mapping[str, str]) -> aio.Session:
        return await aio.connect(address, timeout=60, context=context)

    async def call(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await function(*args, **kwargs)

    def event(self) -> asyncio.Event:
        return asyncio.Event()

    async def wait(self, event: Event, seconds: float) -> None:
        assert isinstance(event, asyncio.Event)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def break_connection(self, session: aio.Session) -> None:
        connection = session._connection
        assert connection.transport is not None
        connection.transport.abort()
        async with asyncio.timeout(30):
            await connection.disconnected

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coroutine)

    async def join(self, spawned: list[Any], seconds: float) -> None:
        """Wait up to ``seconds`` for the spawned tasks; cancel those still running."""
        if not spawned:
            return
        _done, pending = await asyncio.wait(spawned, timeout=seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class BlockingFlavour:
    """The blocking client: a reader and a dispatcher thread per session race our state."""

    strict: bool = False
    windows: tuple[int, ...] = (1, 3, 8, 20, 40)
    race_delays: tuple[float, ...] = (0.0,)
    iterates: bool = False

    async def connect(self, address: str, context: Mapping[str, str]) -> blocking.Session:
        return blocking.connect(address, timeout=60, context=context)

    async def call(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    def event(self) -> threading.Event:
        return threading.Event()

    async def wait(self, event: Event, seconds: float) -> None:
        assert isinstance(event, threading.Event)
        event.wait(seconds)

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 (blocking on purpose: no event loop here)

    async def break_connection(self, session: blocking.Session) -> None:
        with contextlib.suppress(OSError):
            session._sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 30
        while not session.closed and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: ASYNC251 (blocking on purpose: no event loop here)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        coroutine.close()
        raise RuntimeError("the blocking flavour runs nothing beside its episode")

    async def join(self, spawned: list[Any], seconds: float) -> None:
        pass


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (every await in it completes at once)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError("a blocking-flavour episode suspended: it awaited something asynchronous")


class ClientLimits(Protocol):
    """What an episode needs from its client process (``client.ClientState``)."""

    index: int
    seed: int
    socket: str
    pids: str
    stall_timeout: float
    codeunit: int  # what it enqueues: CHAOS, or CHAOS_VICTIM for a victim


class Episode:
    """One session's life: enqueue ``claim`` tasks amid cancels, record changes, page closes,
    then end naturally, by ``session.close()`` or by breaking the connection."""

    def __init__(
        self, client: ClientLimits, seq: int, rng: random.Random, flavour: Flavour
    ) -> None:
        self.client = client
        self.rng = rng
        self.io = flavour
        self.ledger = Ledger(seed=client.seed, client=client.index, seq=seq, strict=flavour.strict)
        self.seq = seq
        self.session: Any = None
        self.pages: list[PageRec] = []
        self.all_pages: list[PageRec] = []
        self.pending: list[TaskRec] = []  # accepted, outcome not yet observed
        self.n = 0
        self.started = time.monotonic()
        self.last_progress = time.monotonic()
        self.progress = flavour.event()
        self.user = rng.choice(USERS)
        self.iterations: list[Any] = []  # progress_updates() iterations running beside

    def tap(self, message: dict[str, object]) -> None:
        self.ledger.on_frame(message)
        self.progress.set()

    async def run(self, claim: int) -> Ledger:
        rng = self.rng
        ledger = self.ledger
        self.session = await self.io.connect(self.client.socket, {"user": self.user})
        ledger.session_id = self.session.id
        ledger.user = self.user
        self.session._core.tap = self.tap
        self.session.on_notification = ledger.notification
        try:
            for _ in range(rng.randint(1, 3)):
                await self.open_page()
            window = rng.choice(self.io.windows)
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
                while len(self.pending) >= window and not ledger.ended:
                    await self.wait_progress()
                if ledger.ended:
                    break
            if not ledger.ended:
                await self.finish(ending)
        except (ConnectionLost, OSError) as err:
            ledger.violation(f"the connection broke: {err}")
            ledger.ended = "broken"
        finally:
            await self.io.call(self.session.close)
            for rec in ledger.tasks:
                await self.sweep_one(rec)
                rec.final = await self.outcome(rec)
            # Every handle has its outcome now: each iteration must have ended, or end soon.
            await self.io.join(self.iterations, ITERATIONS_END)
        ledger.verify()
        return ledger

    # --- the handles -------------------------------------------------------------------

    async def outcome(self, rec: TaskRec) -> Outcome | None:
        """The handle's outcome, or None while it has none (never waits)."""
        handle = rec.handle
        if not handle.done():
            return None
        error = await self.io.call(handle.exception)
        return classify(error, None if error else await self.io.call(handle.result))

    async def sweep_one(self, rec: TaskRec) -> bool:
        if rec.first is None:
            outcome = await self.outcome(rec)
            if outcome is not None and self.ledger.observe(rec, outcome):
                self.last_progress = time.monotonic()
        return rec.first is not None

    async def sweep(self) -> None:
        self.pending = [rec for rec in self.pending if not await self.sweep_one(rec)]

    async def wait_progress(self) -> None:
        self.progress.clear()  # before the sweep: a frame read meanwhile sets it again
        await self.sweep()
        if not self.pending:
            return
        await self.io.wait(self.progress, PROGRESS_WAIT)
        await self.sweep()
        stall = self.client.stall_timeout
        if self.pending and time.monotonic() - self.last_progress > stall:
            try:
                status: object = await self.io.call(self.session.status)
            except PbtError as err:
                status = {"error": str(err)}
            self.ledger.stalled(self.pending, stall, status)

    # --- actions -------------------------------------------------------------------------

    def new_task(self) -> TaskRec:
        rng = self.rng
        page = rng.choice(self.pages)
        self.n += 1
        token = f"c{self.client.index}e{self.seq}n{self.n}"
        codeunit = self.client.codeunit
        if codeunit == CHAOS and rng.random() < P_SHARED:
            codeunit = rng.choice(SHARED_CODEUNITS)
            mode, params = self.shared_params()
        else:
            mode = rng.choices(list(MODE_WEIGHTS), weights=list(MODE_WEIGHTS.values()))[0]
            params = {
                "mode": mode,
                "token": token,
                "page": str(page.seq),
                "episode": str(self.seq),
                "ms": str(rng.randint(1, 30) if mode == "sleep" else rng.randint(1, 255)),
                "pids": self.client.pids,
            }
            if mode == "progress":
                params["ms"] = str(rng.randint(5, 15))
                params["steps"] = str(rng.randint(3, 8))
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
            codeunit=codeunit,
        )

    def shared_params(self) -> tuple[str, dict[str, str]]:
        """A shared task: one of a few parameter sets, identical to other sessions' tasks."""
        rng = self.rng
        mode = rng.choices(list(SHARED_MODE_WEIGHTS), weights=list(SHARED_MODE_WEIGHTS.values()))[0]
        key = rng.choices(list(SHARED_KEYS), weights=list(SHARED_KEYS.values()))[0]
        params = {"mode": mode, "key": str(key), "ms": "7"}
        if mode == "sleep":
            params["ms"] = str(LONG_SLEEP_MS if key == 3 else 5 + 10 * key)
        elif mode == "progress":
            params["ms"] = str(8 + 2 * key)
            params["steps"] = str(3 + key)
        return mode, params

    def timeout_of(self, rec: TaskRec) -> int:
        if rec.mode in TIMING_OUT:
            return self.rng.randint(*SPIN_TIMEOUT_MS)
        return NORMAL_TIMEOUT_MS

    async def open_page(self) -> None:
        seq = len(self.all_pages) + 1
        record = f"R{self.rng.randint(1, 9)}"
        page = await self.io.call(self.session.open_page, f"Chaos {seq}", record_id=record)
        rec = PageRec(page, seq, watches_progress=self.rng.random() < P_WATCH_PROGRESS)
        ledger = self.ledger
        page.on_completed = lambda task_id, results: ledger.trigger_completed(rec, task_id, results)
        page.on_error = lambda task_id, code, text, stack: ledger.trigger_error(
            rec, task_id, code, text, stack
        )
        if rec.watches_progress:
            page.on_progress = lambda task_id, progress: ledger.on_progress(rec, task_id, progress)
        self.pages.append(rec)
        self.all_pages.append(rec)

    async def enqueue(self) -> bool:
        rec = self.new_task()
        expected_id = self.ledger.register(rec)
        rec.t_enqueue = time.monotonic()
        try:
            handle = await self.io.call(
                rec.page.page.enqueue_background_task,
                rec.codeunit,
                rec.params,
                timeout=self.timeout_of(rec),
                error_level=rec.level,
            )
        except EnqueueError as err:
            self.ledger.refused(expected_id, err.code, err.text)
            return False
        self.ledger.accepted(rec, handle, time.monotonic() - self.started)
        self.pending.append(rec)
        if rec.mode == "progress" and self.io.iterates and self.rng.random() < P_ITERATE:
            self.iterations.append(self.io.spawn(self.iterate(rec)))
        if self.rng.random() < P_RACE_CANCEL:
            delay = self.rng.choice(self.io.race_delays)
            if delay:
                await self.io.sleep(delay)
            await self.cancel(rec)
        return True

    async def iterate(self, rec: TaskRec) -> None:
        """Follow the task's progress with ``progress_updates()`` until it ends by itself."""
        it = IterRec()
        rec.iterated.append(it)
        try:
            async for value in rec.handle.progress_updates():
                it.values.append((dict(value), rec.handle.done()))
            it.ended = True
        except Exception as err:  # the ledger reports it
            it.error = repr(err)

    async def cancel(self, rec: TaskRec) -> None:
        if rec.cancel_result is not None:
            return
        result = await self.io.call(rec.handle.cancel)
        await self.sweep_one(rec)
        self.ledger.cancelled(rec, result, time.monotonic() - self.started)

    async def page_pending(self, page: PageRec) -> list[TaskRec]:
        return [rec for rec in self.pending if rec.page is page and not await self.sweep_one(rec)]

    async def set_record(self, page: PageRec) -> None:
        self.ledger.counts["set_record"] += 1
        affected = await self.page_pending(page)
        page.gen += 1
        record = f"R{self.rng.randint(10, 10**6)}"
        for rec in affected:
            rec.notes.append(f"set_record {record!r}")
        await self.io.call(page.page.set_record, record)
        page.settled_gen = page.gen
        for rec in affected:
            await self.sweep_one(rec)
        self.ledger.expect_done(affected, "set_record()", {CancelReason.RECORD_CHANGED})

    async def close_page(self, page: PageRec) -> None:
        self.ledger.counts["page_close"] += 1
        affected = await self.page_pending(page)
        page.closing = True
        for rec in affected:
            rec.notes.append("page closed")
        await self.io.call(page.page.close)
        page.closed = True
        self.pages.remove(page)
        for rec in affected:
            await self.sweep_one(rec)
        self.ledger.expect_done(affected, "page.close()", {CancelReason.PAGE_CLOSED})
        await self.open_page()

    async def finish(self, ending: str) -> None:
        ledger = self.ledger
        if ending == "natural":
            while self.pending and not ledger.ended:
                await self.wait_progress()
            if ledger.ended:
                return
            await self.wait_triggers()
            ledger.ended = "natural"
            return
        await self.sweep()
        affected = list(self.pending)
        for rec in affected:
            rec.notes.append(f"session {ending}")
        if ending == "close":
            ledger.ended = "close"
            await self.io.call(self.session.close)
            await self.sweep()
            ledger.expect_done(affected, "session.close()", {CancelReason.SESSION_CLOSED})
        else:
            ledger.ended = "abort"
            await self.io.break_connection(self.session)
            await self.sweep()
            ledger.expect_done(affected, "the connection was broken", {"lost"})

    async def wait_triggers(self) -> None:
        """Let the dispatcher run the triggers that are due (bounded)."""
        deadline = time.monotonic() + 30
        while self.ledger.due() and time.monotonic() < deadline:
            await self.io.sleep(0.01)


# --- lanes: concurrent sessions of one client process ----------------------------------------


class Budget(ClientLimits, Protocol):
    def claim(self, rng: random.Random) -> tuple[int, int]: ...
    def absorb(self, ledger: Ledger) -> None: ...


async def _lane(client: Budget, lane_no: int, flavour: Flavour) -> None:
    rng = random.Random(f"{client.seed}/{client.index}/{lane_no}")
    while True:
        seq, claim = client.claim(rng)
        if claim <= 0:
            return
        episode = Episode(client, seq, random.Random(f"{client.seed}/{seq}/{claim}"), flavour)
        try:
            await episode.run(claim)
        finally:
            client.absorb(episode.ledger)


async def run_aio_lanes(client: Budget, sessions: int) -> None:
    """``sessions`` concurrent episodes at a time on one event loop."""
    async with asyncio.TaskGroup() as group:
        for lane_no in range(sessions):
            group.create_task(_lane(client, lane_no, AioFlavour()))


def run_blocking_lanes(client: Budget, sessions: int) -> None:
    """``sessions`` concurrent episodes at a time, one thread each."""
    errors: collections.deque[BaseException] = collections.deque()

    def lane(lane_no: int) -> None:
        try:
            run_blocking(_lane(client, lane_no, BlockingFlavour()))
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
