"""The worker pool: fork, feed, watch, kill and replace worker processes.

The only module that touches worker processes. Everything runs in the broker's event loop
and never blocks it: pipes are non-blocking fds watched with ``add_reader``; a worker's death
is seen through its pidfd (``Process.sentinel`` would wait for grandchildren that inherited
it, package-notes §3.4) and classified from its exit status.

Start method: **fork**, named here once. multiprocessing-logging works only with fork
(package-notes §0.1); fork is also 50x cheaper than spawn, which keeps a replacement worker
ready within a few ms of a kill. The hazards of forking from a running asyncio loop are
handled by the worker's prologue (workers/main.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import psutil

from pbt_server import proctree
from pbt_server.logs import queue_fds, retire_worker_handler
from pbt_server.protocol import pack, pipe_unpacker
from workers.main import EXIT_BOOT_FAILURE, WorkerSpec, run_worker

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    import msgpack

    from pbt_server.sessions import Task

_MP: Final = multiprocessing.get_context("fork")
BOOT_RETRY_LIMIT: Final = 8  # consecutive boot failures (~20 s of backoff) before giving up
BOOT_BACKOFF_MAX: Final = 10.0
RETIRE_GRACE: Final = 10.0  # seconds a retired worker may take to exit
STANDBY: Final = -1  # the slot number of the standby worker
STANDBY_REFILL_DELAY: Final = 0.02  # let the work a kill freed go first, then fork
SWEEP_INTERVAL: Final = 2.0  # seconds between sweeps for escaped processes (~30 µs each)

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # job pipe closed; exits when it reads EOF
    KILLED = "killed"  # SIGKILLed by us; waiting to be reaped
    DEAD = "dead"


@dataclass(eq=False, slots=True, repr=False)
class Worker:
    slot: int
    gen: int
    process: BaseProcess
    pid: int
    job_w: int
    res_r: int
    pidfd: int
    unpacker: msgpack.Unpacker
    state: WorkerState = WorkerState.BOOTING
    task: Task | None = None
    tasks_done: int = 0
    pending: bytearray = field(default_factory=bytearray)  # job bytes the pipe did not take
    log_handler: logging.Handler | None = None
    timer: asyncio.TimerHandle | None = None
    exited: bool = False  # its pidfd fired: whatever it still says, it takes no more work
    _ps: psutil.Process | None = None

    def __repr__(self) -> str:
        # Cheap and side-effect free: deque.remove() formats it on a miss, and the dataclass
        # repr would read /proc through the psutil handle (and fail when fds run out).
        return f"<Worker slot={self.slot} gen={self.gen} pid={self.pid} {self.state.value}>"

    def rss(self) -> int:
        """Resident memory in bytes (cached psutil handle: ~30 µs); 0 once gone."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            return int(self._ps.memory_info().rss)
        except psutil.Error:
            return 0


class PoolListener(Protocol):
    """What the pool reports to the broker."""

    def worker_idle(self, worker: Worker) -> None: ...
    def task_started(self, worker: Worker, task: Task) -> None: ...
    def task_done(self, worker: Worker, task: Task, results: dict[str, str]) -> None: ...
    def task_failed(self, worker: Worker, task: Task, code: str, text: str, stack: str) -> None: ...
    def worker_crashed(self, worker: Worker, task: Task, how: str) -> None: ...
    def pool_broken(self, reason: str) -> None: ...


class WorkerPool:
    """``count`` worker slots, each holding one live worker incarnation at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: PoolListener,
        *,
        count: int,
        database_url: str,
        max_result_bytes: int,
        max_tasks_per_worker: int,
        keep_sockets: frozenset[int] = frozenset(),
    ) -> None:
        self.loop = loop
        self.listener = listener
        self.count = count
        self.database_url = database_url
        self.max_result_bytes = max_result_bytes
        self.max_tasks_per_worker = max_tasks_per_worker
        self.keep_sockets = keep_sockets
        self.slots: list[Worker | None] = [None] * count
        # One booted spare: a killed worker's slot is refilled at once by promoting it, so
        # kill+replace costs no fork on the critical path (the refill forks a little later).
        self.standby: Worker | None = None
        self.idle: deque[Worker] = deque()
        self.others: set[Worker] = set()  # retiring or killed, not yet reaped
        self.boot_failures = 0
        self.last_boot_error = ""
        self.stopping = False
        # Builds each worker's own multiprocessing-logging handler (logs.py says why).
        self.log_handler_factory: Callable[[str], logging.Handler] | None = None
        self.fork_failures = 0
        self._gen = 0
        self._ready_waiter: asyncio.Future[None] | None = None
        self._reaped = asyncio.Event()  # set whenever a worker process has been reaped
        self._sweeper: asyncio.TimerHandle | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, boot_limit: float) -> None:
        """Fork every worker and wait until all are ready (at most ``boot_limit`` seconds).

        Raises:
            RuntimeError: a worker could not boot (the message is the worker's reason).
        """
        self._ready_waiter = self.loop.create_future()
        for slot in range(self.count):
            self.spawn(slot)
        self.spawn(STANDBY)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        try:
            async with asyncio.timeout(boot_limit):
                await self._ready_waiter
        except TimeoutError:
            raise RuntimeError(f"workers did not become ready within {boot_limit:.0f} s") from None
        finally:
            self._ready_waiter = None

    def spawn(self, slot: int) -> Worker | None:
        """Fork a worker into ``slot``; if the OS refuses (no fds, no memory), retry later."""
        try:
            worker = self._fork(slot)
        except OSError as err:
            self.fork_failures += 1
            delay = min(0.1 * 2**self.fork_failures, BOOT_BACKOFF_MAX)
            log.error("cannot start a worker in slot %d: %s; retrying in %.1f s", slot, err, delay)
            self.loop.call_later(delay, self._respawn_if_empty, slot)
            return None
        self.fork_failures = 0
        return worker

    def replace(self, slot: int) -> None:
        """Refill ``slot``: with the standby at once if it is ready, else by a fork on the next
        loop turn (so the caller's outcome goes out first)."""
        if self.stopping:
            return
        standby = self.standby
        if slot == STANDBY:
            self.loop.call_later(STANDBY_REFILL_DELAY, self._respawn_if_empty, STANDBY)
        elif standby is not None and standby.state is WorkerState.IDLE and not standby.exited:
            self.standby = None
            standby.slot = slot  # standby -> slot
            self.slots[slot] = standby
            self.idle.append(standby)
            self.loop.call_soon(self.listener.worker_idle, standby)
            self.loop.call_later(STANDBY_REFILL_DELAY, self._respawn_if_empty, STANDBY)
        else:
            self.loop.call_soon(self._respawn_if_empty, slot)

    def _fork(self, slot: int) -> Worker:
        opened: list[int] = []
        handler: logging.Handler | None = None
        try:
            job_r, job_w = os.pipe()
            opened += (job_r, job_w)
            res_r, res_w = os.pipe()
            opened += (res_r, res_w)
            os.set_blocking(job_w, False)
            os.set_blocking(res_r, False)
            self._gen += 1
            if self.log_handler_factory is not None:
                handler = self.log_handler_factory(f"pbt-worker-log-{slot}.{self._gen}")
            spec = WorkerSpec(
                slot=slot,
                gen=self._gen,
                job_r=job_r,
                res_w=res_w,
                close_fds=(job_w, res_r, *self._fds()),
                keep_sockets=self.keep_sockets,
                broker_pid=os.getpid(),
                database_url=self.database_url,
                max_result_bytes=self.max_result_bytes,
                log_handler=handler,
            )
            # daemon=True: if the broker ever exits without stopping us, multiprocessing's
            # atexit terminates workers instead of joining them (a join would wait on our pipes).
            process = _MP.Process(
                target=run_worker, args=(spec,), name=f"pbt-worker-{slot}", daemon=True
            )
            process.start()
        except BaseException:
            for fd in opened:
                os.close(fd)
            if handler is not None:
                retire_worker_handler(handler)
            raise
        os.close(job_r)
        os.close(res_w)
        pid = process.pid
        assert pid is not None
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # both sides call it, so killpg works from the first instant
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # unwatchable: never let it run
            process.join()
            process.close()
            for fd in (job_w, res_r):
                os.close(fd)
            if handler is not None:
                retire_worker_handler(handler)
            raise
        worker = Worker(slot, self._gen, process, pid, job_w, res_r, pidfd, pipe_unpacker())
        worker.log_handler = handler
        if slot == STANDBY:
            self.standby = worker
        else:
            self.slots[slot] = worker
        self.loop.add_reader(res_r, self._on_readable, worker)
        self.loop.add_reader(pidfd, self._on_exit, worker)
        log.debug("worker %d (slot %d, gen %d) forked", pid, slot, worker.gen)
        return worker

    def _fds(self) -> list[int]:
        """Every fd a new worker must not hold: the other workers' pipes, pidfds, sentinels
        and log queues (holding a dead worker's queue open would keep its reader waiting)."""
        fds: list[int] = []
        for worker in self.workers():
            fds += (worker.job_w, worker.res_r, worker.pidfd, worker.process.sentinel)
            if worker.log_handler is not None:
                fds += queue_fds(worker.log_handler)
        return [fd for fd in fds if fd >= 0]

    def workers(self) -> list[Worker]:
        standby = [self.standby] if self.standby is not None else []
        return [w for w in self.slots if w is not None] + standby + list(self.others)

    def pids(self) -> set[int]:
        return {w.pid for w in self.workers()}

    # --- tasks ----------------------------------------------------------------------------

    def assign(self, worker: Worker, task: Task) -> None:
        assert worker.state is WorkerState.IDLE, worker.state
        worker.state = WorkerState.BUSY  # IDLE -> BUSY
        worker.task = task
        self._send(
            worker,
            pack(
                {
                    "op": "run",
                    "job": task.job,
                    "codeunit": task.codeunit,
                    "parameters": task.parameters,
                    "task": task.id,
                    "session": task.session.id,
                    "record": task.record,
                    "timeout": task.timeout_ms,
                }
            ),
        )

    def _send(self, worker: Worker, data: bytes) -> None:
        if not worker.pending:
            try:
                written = os.write(worker.job_w, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the worker is gone; its pidfd reports how
            if written == len(data):
                return
            data = data[written:]
            self.loop.add_writer(worker.job_w, self._on_writable, worker)
        worker.pending += data

    def _on_writable(self, worker: Worker) -> None:
        try:
            written = os.write(worker.job_w, worker.pending)
        except BlockingIOError:
            return
        except OSError:
            written = len(worker.pending)
        del worker.pending[:written]
        if not worker.pending:
            self.loop.remove_writer(worker.job_w)

    def _on_readable(self, worker: Worker) -> None:
        try:
            data = os.read(worker.res_r, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(worker.res_r)  # EOF: the pidfd tells how it ended
            return
        worker.unpacker.feed(data)
        for message in worker.unpacker:
            self._handle(worker, message)

    def _handle(self, worker: Worker, message: dict[str, Any]) -> None:
        op = message.get("op")
        if message.get("gen") != worker.gen or worker.state in (
            WorkerState.KILLED,
            WorkerState.DEAD,
        ):
            return  # a late word from an incarnation we already gave up on
        if op == "ready":
            if worker.exited or worker.state is not WorkerState.BOOTING:
                return  # died right after (a boot failure), or retired while booting
            worker.state = WorkerState.IDLE  # BOOTING -> IDLE
            self.boot_failures = 0
            if worker is self.standby:
                return  # waits, booted, until a slot needs it
            self._check_all_ready()
            self.idle.append(worker)
            self.listener.worker_idle(worker)
            return
        if op == "boot_failed":
            self.last_boot_error = str(message.get("text", ""))
            return
        task = worker.task
        if task is None or message.get("job") != task.job:
            log.warning(
                "worker %d sent %r for job %r it is not running", worker.pid, op, message.get("job")
            )
            return
        if op == "started":
            self.listener.task_started(worker, task)
        elif op in ("done", "failed"):
            worker.task = None
            worker.tasks_done += 1
            worker.state = WorkerState.IDLE  # BUSY -> IDLE
            if op == "done":
                self.listener.task_done(worker, task, message["results"])
            else:
                self.listener.task_failed(
                    worker, task, message["code"], message["text"], message["stack"]
                )
            # The listener may have retired or killed it; a worker whose death is being
            # processed must not go back to the idle list, or a new task would be lost with it.
            if worker.state is WorkerState.IDLE and not worker.exited:
                if self.max_tasks_per_worker and worker.tasks_done >= self.max_tasks_per_worker:
                    self.retire(worker)
                else:
                    self.idle.append(worker)
                    self.listener.worker_idle(worker)

    def _check_all_ready(self) -> None:
        waiter = self._ready_waiter
        if (
            waiter is not None
            and not waiter.done()
            and all(w is not None and w.state is not WorkerState.BOOTING for w in self.slots)
        ):
            waiter.set_result(None)

    # --- ending workers -------------------------------------------------------------------

    def kill(self, worker: Worker, reason: str) -> None:
        """SIGKILL the worker's whole tree now and put a fresh worker in its slot."""
        if worker.state in (WorkerState.KILLED, WorkerState.DEAD):
            return
        proctree.kill_tree(worker.pid, worker.pidfd)
        # A retiring one was replaced already; the standby is replaced as a standby.
        owned_slot = worker is self.standby or self.slots[worker.slot] is worker
        self._detach(worker, WorkerState.KILLED)
        log.info("worker %d killed (%s)", worker.pid, reason)
        if owned_slot:
            self.replace(worker.slot)

    def retire(self, worker: Worker) -> None:
        """Let an idle worker exit cleanly (its logs flush) and replace it."""
        self._detach(worker, WorkerState.RETIRING)
        log.info("worker %d retired after %d tasks", worker.pid, worker.tasks_done)
        # Whatever keeps a retired worker from exiting (a codeunit's stuck finalizer, say),
        # it does not get to run on: it has a deadline.
        self.loop.call_later(RETIRE_GRACE, self._kill_if_retiring, worker)
        self.replace(worker.slot)

    def _kill_if_retiring(self, worker: Worker) -> None:
        if worker.state is WorkerState.RETIRING and not worker.exited:
            self.kill(worker, f"retired, but still running after {RETIRE_GRACE:.0f} s")

    def _detach(self, worker: Worker, state: WorkerState) -> None:
        """Take the worker out of its slot; it lives on in ``others`` until reaped."""
        worker.state = state  # * -> KILLED | RETIRING
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if worker is self.standby:
            self.standby = None
        elif self.slots[worker.slot] is worker:
            self.slots[worker.slot] = None
        self.others.add(worker)
        self._close_job_pipe(worker)

    def _close_job_pipe(self, worker: Worker) -> None:
        if worker.job_w >= 0:
            if worker.pending:
                self.loop.remove_writer(worker.job_w)
                worker.pending.clear()
            os.close(worker.job_w)
            worker.job_w = -1

    def _on_exit(self, worker: Worker) -> None:
        """The pidfd says the worker's process has ended: reap it and find out how."""
        worker.exited = True
        self._on_readable_until_eof(worker)  # a result written just before death still counts
        self.loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        # Reap through multiprocessing (one reaper per child, §3.2). Not join(0): that waits on
        # the sentinel pipe, which a forked grandchild may still hold; the pidfd already said
        # the process ended, so this waitpid returns at once.
        worker.process.join()
        code = worker.process.exitcode
        self.loop.remove_reader(worker.res_r)
        os.close(worker.res_r)
        self._close_job_pipe(worker)
        worker.process.close()
        if worker.log_handler is not None:
            retire_worker_handler(worker.log_handler)
        previous = worker.state
        self._detach(worker, WorkerState.DEAD)
        self.others.discard(worker)
        worker.state = WorkerState.DEAD  # * -> DEAD
        self._reaped.set()
        self._reap_orphans_later()  # what the worker started is ours now (subreaper)
        if previous in (WorkerState.KILLED, WorkerState.RETIRING) or self.stopping:
            return
        how = describe_exit(code)
        if previous is WorkerState.BOOTING:
            self._boot_failed(worker, code, how)
            return
        log.error("worker %d died: %s", worker.pid, how)
        self.replace(worker.slot)
        if worker.task is not None:
            task, worker.task = worker.task, None
            self.listener.worker_crashed(worker, task, how)

    def _on_readable_until_eof(self, worker: Worker) -> None:
        while worker.state not in (WorkerState.DEAD, WorkerState.KILLED):
            try:
                data = os.read(worker.res_r, 1 << 16)
            except OSError:
                return
            if not data:
                return
            worker.unpacker.feed(data)
            for message in worker.unpacker:
                self._handle(worker, message)

    def _boot_failed(self, worker: Worker, code: int | None, how: str) -> None:
        reason = self.last_boot_error or how
        if code != EXIT_BOOT_FAILURE:
            reason = f"{reason} ({how})" if self.last_boot_error else how
        self.boot_failures += 1
        waiter = self._ready_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(RuntimeError(f"worker failed to boot: {reason}"))
            return
        if self.boot_failures >= BOOT_RETRY_LIMIT:
            self.listener.pool_broken(
                f"{self.boot_failures} workers in a row failed to boot; last: {reason}"
            )
            return
        delay = min(0.1 * 2**self.boot_failures, BOOT_BACKOFF_MAX)
        log.error("worker failed to boot (%s); retrying in %.1f s", reason, delay)
        self.loop.call_later(delay, self._respawn_if_empty, worker.slot)

    def _respawn_if_empty(self, slot: int) -> None:
        if self.stopping:
            return
        if (self.standby if slot == STANDBY else self.slots[slot]) is None:
            self.spawn(slot)

    def _reap_orphans_later(self) -> None:
        def reap(attempt: int) -> None:
            if proctree.reap_orphans(self.pids()) and attempt < 50:
                self.loop.call_later(0.02 * (attempt + 1), reap, attempt + 1)

        self.loop.call_soon(reap, 0)

    def _sweep(self) -> None:
        """Every few seconds: kill what escaped a live worker's tree (a ``setsid`` daemon
        reparents to us as soon as its own parent exits, long before the worker dies)."""
        proctree.reap_orphans(self.pids())
        if not self.stopping:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self, grace: float) -> None:
        """Stop every worker: idle ones exit on EOF (``grace`` seconds); busy ones are killed."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for worker in self.workers():
            if worker.state is WorkerState.BUSY:
                self.kill(worker, "server stopping")
            elif worker.state in (WorkerState.IDLE, WorkerState.BOOTING):
                self._detach(worker, WorkerState.RETIRING)
        try:
            async with asyncio.timeout(grace):
                await self._all_reaped()
        except TimeoutError:
            for worker in list(self.others):
                self.kill(worker, f"did not exit within {grace:.0f} s")
            await self._all_reaped()
        proctree.reap_orphans(set())

    async def _all_reaped(self) -> None:
        while self.others:
            self._reaped.clear()
            await self._reaped.wait()


def describe_exit(code: int | None) -> str:
    """Say how a worker ended: ``exit code 3`` or ``signal SIGSEGV``."""
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (possibly out of memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"
