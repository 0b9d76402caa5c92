"""The worker pool: fork, feed, watch, kill and replace worker processes.

The only module that touches worker processes, and the only one that knows which worker runs
which task. Everything runs in the broker's event loop and never blocks it: pipes are
non-blocking fds watched with ``add_reader``; a worker's death is seen through its pidfd
(``Process.sentinel`` would also wait for grandchildren that inherited it) and classified
from its exit status.

Start method: **fork**, named here once. multiprocessing-logging works only with fork, and
fork is 50x cheaper than spawn, which keeps a replacement worker ready within a few ms of a
kill. The hazards of forking from a running asyncio loop are handled by the worker's
prologue (``workers/main.py``).

The verbs: :meth:`WorkerPool.assign` hands a task to an idle worker, :meth:`worker_of` names
the worker running a task, :meth:`abort` kills that worker and forgets the task,
:meth:`retire` lets a worker exit after its task, :meth:`replace` refills a slot (from the
booted standby when it can). A reload: :meth:`trial` imports the new code in a process of
its own and reports what it found; when it could, :func:`reimage_workers` imports it into
the broker and :meth:`renew` forks every later worker with it (and the new settings),
retires the idle ones at once and the busy ones after their task, and resizes the pool. The
pool finishes its own bookkeeping before it tells the broker anything
(:class:`PoolListener`), so the broker may assign or abort from inside any callback.

Worker states::

    BOOTING --ready--> IDLE --assign--> BUSY --done/failed--> IDLE
       |                 |                |       (or RETIRING: a task left something
       |                 |                |        behind, or MaxTasksPerWorker reached)
       |                 |                +--timeout--> DUMPING --stack or 10 ms--> KILLED
       |                 |                +--release (cancel)--> DRAINING --ends--> standby
       |                 |                |                   (or RETIRING) | CancelGrace: KILLED
       +--------+--------+-------+--------+
                |                |
            retire/stop       abort/kill/protocol fault
                v                v
             RETIRING         KILLED  --pidfd--> DEAD
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import multiprocessing
import os
import signal
import struct
import termios
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import psutil

from pbt_server import proctree
from pbt_server.codeunits import Codeunit, load_modules, reimport, restore, snapshot
from pbt_server.config import CodeunitsSection, DatabaseSection, WorkersSection
from pbt_server.errors import BootFailed, ProtocolError, ReloadFailed
from pbt_server.events import Event, event, task_event
from pbt_server.logs import queue_fds, retire_worker_handler
from pbt_server.proctree import describe_exit
from pbt_server.protocol import FROM_TRIAL, FROM_WORKER, Run, Tried, brief, pack, pipe_unpacker
from workers.database import preload
from workers.main import EXIT_BOOT_FAILURE, STACK_SIGNAL, WorkerSpec, run_trial, run_worker

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    import msgpack

    from pbt_server.sessions import Task

_MP: Final = multiprocessing.get_context("fork")
BOOT_RETRY_LIMIT: Final = 8  # consecutive boot failures (~20 s of backoff) before giving up
BOOT_BACKOFF_MAX: Final = 10.0
RETIRE_GRACE: Final = 10.0  # seconds a retired worker may take to exit
STANDBY: Final = -1  # the slot number of the standby worker
TRIAL: Final = -2  # ... and of a reload's trial process
TRIAL_MESSAGE_LIMIT: Final = 1 << 20  # bytes a trial may say (its codeunits and files)
STANDBY_REFILL_DELAY: Final = 0.02  # let the work a kill freed go first, then fork
# After a worker's death, what is not the page's news waits this long: its leftover
# processes' sweep (a few /proc reads per broker thread, up to 2 ms on a cold cache) and its
# log receiver's end; the page's error and its next task go first.
AFTER_DEATH_DELAY: Final = 0.005
SWEEP_INTERVAL: Final = 2.0  # seconds between sweeps for escaped processes (~30 µs each)
MESSAGE_OVERHEAD: Final = 256  # a pipe message's own fields around a result or error text
STACK_QUIET: Final = 0.002  # the dump is complete when the pipe is quiet this long ...
STACK_WAIT: Final = 0.010  # ... or after this, whatever came (a stopped worker sends none)
STACK_LIMIT: Final = 8192  # bytes of a dump that reach the error and the log

log = logging.getLogger(__name__)


def backoff(failures: int) -> float:
    """Seconds to wait before the next attempt after ``failures`` failures in a row."""
    return float(min(0.1 * 2**failures, BOOT_BACKOFF_MAX))


# --- what every worker inherits ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerImage:
    """What the broker prepares once, before its loop and its first fork, for every worker."""

    codeunits: Mapping[int, Codeunit]
    keep_fds: frozenset[int]  # sockets etc. the codeunit modules opened at import: theirs


def prepare_workers(codeunits: CodeunitsSection, database: DatabaseSection) -> WorkerImage:
    """Import the codeunit modules and the database driver into the broker, once.

    Workers are forked from the broker, so they inherit both instead of importing them at
    every boot. Sockets that exist now were opened by the modules and stay open in the
    workers; every socket the broker opens later (listeners, clients) is closed there.

    Raises:
        ImportError: a module cannot be imported (or called ``sys.exit`` at import).
    """
    before = set(threading.enumerate())
    found = load_modules(codeunits.modules)
    _warn_of_threads(before)
    preload(database)
    return WorkerImage(codeunits=found, keep_fds=frozenset(proctree.shared_fds()))


def reimage_workers(
    image: WorkerImage,
    modules: tuple[str, ...],
    prefixes: tuple[str, ...],
    database: DatabaseSection,
) -> WorkerImage:
    """A reload, after its trial: import the new code into the broker, for every later fork.

    The modules under ``prefixes`` are imported afresh (the trial compiled them: this takes
    a few ms); what else they import stays. Every worker forked from now on inherits the
    new code, whatever the files say later. The broker's signal handlers are put back if
    a module changed them.

    Raises:
        ImportError: the import failed this time (a file changed since the trial); the
            old modules and codeunits are back in place.
    """
    saved = snapshot(prefixes)
    handlers = {signum: signal.getsignal(signum) for signum in _HANDLED}
    threads = set(threading.enumerate())
    fds = proctree.shared_fds()
    try:
        found = reimport(modules, prefixes)
        preload(database)
    except BaseException:
        restore(saved)
        raise
    finally:
        for signum, handler in handlers.items():
            if handler is not None and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
    _warn_of_threads(threads)
    # Sockets the new modules opened at import are theirs: workers keep them too.
    return WorkerImage(found, keep_fds=image.keep_fds | (proctree.shared_fds() - fds))


_HANDLED: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
    signal.SIGPIPE,
)


def _warn_of_threads(before: set[threading.Thread]) -> None:
    for thread in set(threading.enumerate()) - before:
        # Only the forking thread survives a fork: a codeunit relying on this thread would
        # wait for it forever, in every worker.
        log.warning(
            "a codeunit module started thread %r at import; threads do not survive the fork"
            " into the workers, so a codeunit that relies on it will hang until its timeout",
            thread.name,
        )


# --- workers ------------------------------------------------------------------------------


class WorkerState(enum.Enum):
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    DUMPING = "dumping"  # its task timed out: dumping its stack, then killed; says nothing more
    DRAINING = "draining"  # its task was cancelled; out of its slot; reused if it ends in time
    RETIRING = "retiring"  # job pipe closed; exits when it reads EOF
    KILLED = "killed"  # SIGKILLed by us; waiting to be reaped
    DEAD = "dead"


@dataclass(eq=False, slots=True, repr=False)
class Worker:
    """One worker incarnation. Written by the pool only; others read ``pid`` and ``state``."""

    slot: int
    gen: int
    process: BaseProcess
    pid: int
    job_w: int
    res_r: int
    pidfd: int
    unpacker: msgpack.Unpacker
    stack_r: int = -1  # where its stack dump arrives
    code: int = 0  # which reload's code and settings it runs (0: those of the start)
    state: WorkerState = WorkerState.BOOTING
    task: Task | None = None
    tasks_done: int = 0
    pending: bytearray = field(default_factory=bytearray)  # job bytes the pipe did not take
    fed: int = 0  # bytes read from its result pipe so far
    draining: int = 0  # the job of the cancelled task it may still finish (DRAINING)
    # Ends a stack dump at once when the worker dies during it (DUMPING): the last bytes
    # of the dump and how the worker ended.
    dump_end: Callable[[bytes, str], None] | None = None
    drain_timer: asyncio.TimerHandle | None = None
    log_handler: logging.Handler | None = None
    exited: bool = False  # its pidfd fired: whatever it still says, it takes no more work
    # A write of its job failed (the worker is gone): that job was never taken.
    undelivered: bool = False
    # Had it taken its task off the pipe when it was killed (measured after the SIGKILL,
    # when it can read no more): the kill's caller decides requeue or failure from this.
    taken_at_kill: bool = False
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


_SILENCED: Final = frozenset({WorkerState.DUMPING, WorkerState.KILLED, WorkerState.DEAD})
_ENDS: Final = frozenset({"done", "failed"})  # the messages that end a task
# A worker in these states was ended (or is being ended) by the pool: its death is no news.
_ENDED_BY_US: Final = frozenset(
    {WorkerState.DUMPING, WorkerState.KILLED, WorkerState.RETIRING, WorkerState.DRAINING}
)


def _taken(worker: Worker) -> bool:
    """Nothing of the worker's job is left to write or to read: the worker took it."""
    if worker.pending or worker.undelivered:
        return False
    if worker.job_w < 0:
        return True  # closed: say taken (a task that might have started never runs twice)
    try:
        unread = fcntl.ioctl(worker.job_w, termios.FIONREAD, _INT)
    except OSError:
        return True
    return struct.unpack("i", unread)[0] == 0


_INT: Final = bytes(4)


class PoolListener(Protocol):
    """What the pool reports to the broker, after its own bookkeeping is done."""

    def capacity_freed(self) -> None:
        """A worker became idle (booted, promoted, or done with a task)."""

    def task_progress(self, task: Task, progress: dict[str, str]) -> None: ...
    def task_done(self, task: Task, results: dict[str, str]) -> None: ...
    def task_failed(self, task: Task, code: str, text: str, stack: str) -> None: ...

    def task_lost(self, task: Task, how: str, *, taken: bool) -> None:
        """The worker running ``task`` died or broke the protocol; it was killed and
        replaced. ``taken``: it had taken the task off its pipe (else the task never
        started there, and may run elsewhere)."""

    def pool_broken(self, reason: str) -> None: ...


class WorkerPool:
    """``Workers.Count`` worker slots, each holding one live worker incarnation at a time,
    plus one booted standby."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: PoolListener,
        workers: WorkersSection,
        database: DatabaseSection,
        *,
        image: WorkerImage,
        max_result_bytes: int,
        log_handler_factory: Callable[[str], logging.Handler] | None = None,
        instance: str = "",
        private_fds: Callable[[], Iterable[int]] = tuple,
    ) -> None:
        self.loop = loop
        self.listener = listener
        self.config = workers
        self.database = database
        self.image = image
        self.max_result_bytes = max_result_bytes
        # Builds each worker's own multiprocessing-logging handler (logs.py says why).
        self.log_handler_factory = log_handler_factory
        self.instance = instance  # marks every worker's environment (proctree.kill_leftovers)
        self.private_fds = private_fds  # the broker's own fds (pid file lock, log file)
        self.slots: list[Worker | None] = [None] * workers.count
        # One booted spare: a killed worker's slot is refilled at once by promoting it, so
        # kill+replace costs no fork on the critical path (the refill forks a little later).
        self.standby: Worker | None = None
        self._idle: deque[Worker] = deque()
        self._running: dict[int, Worker] = {}  # job -> the worker running it
        self._others: set[Worker] = set()  # retiring or killed, not yet reaped
        self._retiring: list[logging.Handler] = []  # reaped workers' log handlers, to retire
        self._trials: dict[int, tuple[int, int]] = {}  # pid -> (result pipe, pidfd)
        self._stopping = False
        self._started = False  # every first worker booted: the server serves
        self._boot_failures = 0
        self._last_boot_error = ""
        self._fork_failures = 0
        self._gen = 0
        self.code = 0  # reloads renewed so far; a worker of an older one is retired
        self._ready_waiter: asyncio.Future[None] | None = None
        self._reaped = asyncio.Event()  # set whenever a worker process has been reaped
        self._sweeper: asyncio.TimerHandle | None = None
        self._max_message = max_result_bytes + MESSAGE_OVERHEAD
        # Told why each worker ended (telemetry.KILL_CAUSES); None: nobody counts.
        self.on_worker_ended: Callable[[str], None] | None = None
        self.ended: Counter[str] = Counter()  # workers ended and replaced, by cause

    @property
    def count(self) -> int:
        return len(self.slots)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, boot_limit: float) -> None:
        """Fork every worker and wait until all are ready (at most ``boot_limit`` seconds).

        Raises:
            BootFailed: a worker could not boot (the message is the worker's reason).
        """
        self._ready_waiter = self.loop.create_future()
        for slot in range(self.count):
            self._spawn(slot)
        self._spawn(STANDBY)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        try:
            async with asyncio.timeout(boot_limit):
                await self._ready_waiter
        except TimeoutError:
            raise BootFailed(f"workers did not become ready within {boot_limit:.0f} s") from None
        finally:
            self._ready_waiter = None
        self._started = True

    async def stop(self, grace: float) -> None:
        """Stop every worker: idle ones exit on EOF (``grace`` seconds); busy ones are killed."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for worker in self.workers():
            if worker.state in (WorkerState.BUSY, WorkerState.DRAINING):
                self._kill(worker, "server stopping")
            elif worker.state in (WorkerState.IDLE, WorkerState.BOOTING):
                self._detach(worker, WorkerState.RETIRING)
        try:
            async with asyncio.timeout(grace):
                await self._all_reaped()
        except TimeoutError:
            for worker in list(self._others):
                self._kill(worker, f"did not exit within {grace:.0f} s")
            await self._all_reaped()
        self._retire_log_handlers()
        proctree.reap_orphans(set())

    def workers(self) -> list[Worker]:
        """Every live incarnation: the slots' workers, the standby, and those being reaped."""
        standby = [self.standby] if self.standby is not None else []
        return [w for w in self.slots if w is not None] + standby + list(self._others)

    def pids(self) -> set[int]:
        """Our children's pids: the workers' and a reload trial's."""
        return {w.pid for w in self.workers()} | set(self._trials)

    # --- reloading ----------------------------------------------------------------------------

    async def trial(
        self,
        modules: tuple[str, ...],
        prefixes: tuple[str, ...],
        database: DatabaseSection,
        limit: float,
    ) -> Tried:
        """Import ``modules`` afresh (the old ones under ``prefixes`` forgotten first) and
        open ``database`` in a process of its own, forked like a worker; say what it found.

        Raises:
            ReloadFailed: the import or the database failed (the message is the reason),
                or the process died or took longer than ``limit`` seconds.
        """
        res_r, res_w = os.pipe()
        os.set_blocking(res_r, False)
        self._gen += 1
        gen = self._gen
        handler = None
        if self.log_handler_factory is not None:
            handler = self.log_handler_factory(f"pbt-reload-trial.{gen}")
        spec = WorkerSpec(
            slot=TRIAL,
            gen=gen,
            job_r=-1,
            res_w=res_w,
            close_fds=(res_r, *self._inherited_fds()),
            keep_fds=self.image.keep_fds,
            broker_pid=os.getpid(),
            database=database,
            max_result_bytes=self.max_result_bytes,
            log_handler=handler,
            instance=self.instance,
            modules=modules,
            prefixes=prefixes,
        )
        process = _MP.Process(target=run_trial, args=(spec,), name="pbt-reload-trial", daemon=True)
        try:
            process.start()
        except BaseException:
            os.close(res_r)
            if handler is not None:
                retire_worker_handler(handler)
            raise
        finally:
            os.close(res_w)
        assert process.pid is not None
        pid = process.pid
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # as for a worker: its group is killed with it
        pidfd = os.pidfd_open(pid)  # a child not yet reaped: its pid cannot be reused
        self._trials[pid] = (res_r, pidfd)
        said = bytearray()
        exited = self.loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                data = os.read(res_r, 1 << 16)
                if not data:
                    self.loop.remove_reader(res_r)
                said.extend(data)
                if len(said) > TRIAL_MESSAGE_LIMIT:
                    proctree.kill_tree(pid, pidfd)

        def ended() -> None:
            if not exited.done():
                exited.set_result(None)

        self.loop.add_reader(res_r, readable)
        self.loop.add_reader(pidfd, ended)
        try:
            async with asyncio.timeout(limit):
                await exited
        except TimeoutError:
            raise ReloadFailed(
                f"the new code did not import (and open the database) within {limit:g} s"
            ) from None
        finally:
            proctree.kill_tree(pid, pidfd)  # its own tree: what its imports started goes too
            self.loop.remove_reader(pidfd)
            process.join()
            readable()
            self.loop.remove_reader(res_r)
            os.close(res_r)
            os.close(pidfd)
            del self._trials[pid]
            if handler is not None:
                retire_worker_handler(handler)
        return self._trial_result(bytes(said), gen, describe_exit(process.exitcode))

    @staticmethod
    def _trial_result(said: bytes, gen: int, how: str) -> Tried:
        if not said:
            raise ReloadFailed(
                f"the reload's trial process {how} before it could say how importing the new"
                " code went"
            )
        unpacker = pipe_unpacker(TRIAL_MESSAGE_LIMIT + (1 << 16))
        try:
            unpacker.feed(said)
            messages = list(unpacker)
            if len(messages) != 1 or type(messages[0]) is not dict:
                raise ProtocolError(f"sent {len(messages)} messages, not one map")
            message = FROM_TRIAL.validate(messages[0])
            if message["gen"] != gen:
                raise ProtocolError(f"said it is incarnation {message['gen']}, not {gen}")
        except ProtocolError as err:
            raise ReloadFailed(f"the reload's trial process {how}: {err.text}") from None
        except Exception as err:
            text = f"the reload's trial process {how}, and said {len(said)} bytes that are"
            raise ReloadFailed(f"{text} not msgpack ({brief(err)})") from None
        if message["op"] == "boot_failed":
            raise ReloadFailed(message["text"])
        return message

    def renew(self, workers: WorkersSection, database: DatabaseSection, image: WorkerImage) -> None:
        """Fork every later worker with this image and these settings; retire the workers
        of the old ones (idle: now; busy: after their task) and resize the pool to
        ``workers.count``."""
        self.config = workers
        self.database = database
        self.image = image
        self.code += 1
        self._boot_failures = 0
        old = len(self.slots)
        if workers.count < old:
            for worker in self.slots[workers.count :]:
                if worker is not None:
                    # Idle or booting: retired below; busy: retired when its task ends.
                    self._others.add(worker)
            del self.slots[workers.count :]
        # The standby first, so no slot is refilled with a worker of the old code.
        for worker in [self.standby, *self.slots, *self._others]:
            if worker is not None and worker.state in (WorkerState.IDLE, WorkerState.BOOTING):
                self.retire(worker, "reload")
        for slot in range(old, workers.count):
            self.slots.append(None)
            self._spawn(slot)

    # --- tasks --------------------------------------------------------------------------------

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    def assign(self, task: Task) -> Worker | None:
        """Hand ``task`` to an idle worker and return it; None if none is idle."""
        if not self._idle:
            return None
        worker = self._idle.popleft()
        assert worker.state is WorkerState.IDLE, worker
        worker.state = WorkerState.BUSY  # IDLE -> BUSY
        worker.task = task
        self._running[task.job] = worker
        run: Run = {
            "op": "run",
            "job": task.job,
            "codeunit": task.codeunit,
            "parameters": task.parameters,
            "task": task.id,
            "session": task.session.id,
            "record": task.record,
            "timeout": task.timeout_ms,
            "context": task.session.context if task.context is None else task.context,
        }
        self._send(worker, pack(run))
        return worker

    def taken(self, task: Task) -> bool:
        """Has the worker ``task`` was handed to taken it off its pipe (all of it)? The
        pipe's unread bytes say so, whatever the worker's code writes or pretends."""
        worker = self._running.get(task.job)
        return worker is not None and _taken(worker)

    def worker_of(self, task: Task) -> Worker | None:
        return self._running.get(task.job)

    def abort(self, task: Task, reason: str, cause: str = "abort") -> bool:
        """Kill the worker running ``task`` (its whole tree) and forget the task; the slot is
        refilled. No listener call follows for this task. Whether the worker had taken the
        task off its pipe by the kill (False if no worker ran it)."""
        worker = self._running.get(task.job)
        if worker is None:
            return False
        self._kill(worker, reason, cause)
        return worker.taken_at_kill

    def release(self, task: Task, reason: str) -> bool:
        """A cancel: forget ``task`` and give its slot a worker at once (the standby), as
        :meth:`abort` does, but let its own worker finish the task aside for up to
        ``CancelGrace``: its answer is dropped and it is reused; past the grace it is
        killed. No listener call follows for this task. False if no worker runs it."""
        worker = self._running.get(task.job)
        if worker is None:
            return False
        grace = self.config.cancel_grace_ms / 1000
        if grace <= 0 or worker.state is not WorkerState.BUSY:
            self._kill(worker, reason, "cancel")
            return True
        self._take_task(worker)
        worker.draining = task.job
        owned = self._owns_slot(worker)
        if owned:
            self.slots[worker.slot] = None
        worker.state = WorkerState.DRAINING  # BUSY -> DRAINING
        self._others.add(worker)
        worker.drain_timer = self.loop.call_later(grace, self._drain_expired, worker, reason)
        if owned:
            self.replace(worker.slot)
        return True

    def _drain_expired(self, worker: Worker, reason: str) -> None:
        worker.drain_timer = None
        if worker.state is WorkerState.DRAINING:
            grace = self.config.cancel_grace_ms
            self._kill(worker, f"{reason}; still running after CancelGrace ({grace} ms)", "cancel")

    def _drained(self, worker: Worker, job: int, leftovers: list[str]) -> None:
        """A cancelled task ended within the grace: its answer is dropped; the worker is
        the next standby if there is room, else it exits cleanly."""
        if job != worker.draining:
            raise ProtocolError(f"spoke of job {job}, which it is not running")
        if worker.drain_timer is not None:
            worker.drain_timer.cancel()
            worker.drain_timer = None
        worker.tasks_done += 1
        clean = not leftovers and worker.code == self.code
        if clean and self.standby is None and not self._stopping:
            self._others.discard(worker)
            worker.slot = STANDBY  # DRAINING -> IDLE, as the standby
            worker.state = WorkerState.IDLE
            self.standby = worker
            return
        self._ended("leftovers" if leftovers else "")
        worker.state = WorkerState.RETIRING  # DRAINING -> RETIRING: exits on EOF
        self._close_job_pipe(worker)
        self.loop.call_later(RETIRE_GRACE, self._kill_if_retiring, worker)
        self.replace(STANDBY)

    def abort_with_stack(self, task: Task, reason: str, then: Callable[[str], None]) -> None:
        """Like :meth:`abort`, but first ask the worker for its threads' Python stacks; call
        ``then(stack)`` once it is killed, at most ``STACK_WAIT`` later (``stack`` says so
        when none came: a worker stopped, or stuck where no signal is handled)."""
        worker = self._running.get(task.job)
        if worker is None:
            then("")
            return
        worker.state = WorkerState.DUMPING  # BUSY -> DUMPING: its answers no longer count
        dump = bytearray()
        started = self.loop.time()
        timer: list[asyncio.TimerHandle] = []
        finished: list[bool] = []

        def finish(died: str = "") -> None:
            if finished:
                return
            finished.append(True)
            worker.dump_end = None
            if worker.state is WorkerState.DUMPING:  # not dead by itself meanwhile
                self.loop.remove_reader(worker.stack_r)
                self._kill(worker, reason, "timeout")
            text = dump[:STACK_LIMIT].decode("utf-8", "replace")
            if not text and died:
                text = f"(no stack: the worker died while it was asked for it: {died})"
            elif not text:
                text = (
                    f"(no stack: the worker did not answer {STACK_SIGNAL.name} within"
                    f" {STACK_WAIT * 1000:.0f} ms: stopped, or stuck where no signal is handled)"
                )
            elif len(dump) > STACK_LIMIT:
                text += f"\n(… {len(dump) - STACK_LIMIT} more bytes)"
            then(text)

        def readable() -> None:
            try:
                data = os.read(worker.stack_r, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone: its pidfd says how, in a moment (dump_end)
                self.loop.remove_reader(worker.stack_r)
                return
            timer[0].cancel()
            dump.extend(data)
            wait = min(STACK_QUIET, started + STACK_WAIT - self.loop.time())
            timer[0] = self.loop.call_later(max(wait, 0.0), finish)

        def ended(data: bytes, how: str) -> None:
            timer[0].cancel()
            dump.extend(data)
            finish(how)

        timer.append(self.loop.call_later(STACK_WAIT, finish))
        worker.dump_end = ended
        self.loop.add_reader(worker.stack_r, readable)
        try:
            signal.pidfd_send_signal(worker.pidfd, STACK_SIGNAL)
        except OSError:
            timer[0].cancel()
            finish()

    def running(self) -> Iterator[tuple[Task, Worker]]:
        """The tasks handed to workers, with their workers."""
        for worker in self._running.values():
            assert worker.task is not None
            yield worker.task, worker

    def _take_task(self, worker: Worker) -> Task | None:
        task, worker.task = worker.task, None
        if task is not None:
            del self._running[task.job]
        return task

    def _send(self, worker: Worker, data: bytes) -> None:
        if not worker.pending:
            try:
                written = os.write(worker.job_w, data)
            except BlockingIOError:
                written = 0
            except OSError:
                worker.undelivered = True  # the worker is gone; its pidfd reports how
                return
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
            worker.undelivered = True
            written = len(worker.pending)
        del worker.pending[:written]
        if not worker.pending:
            self.loop.remove_writer(worker.job_w)

    # --- what workers say ---------------------------------------------------------------------

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
        self._feed(worker, data)

    def _feed(self, worker: Worker, data: bytes) -> None:
        unpacker = worker.unpacker
        worker.fed += len(data)
        try:
            unpacker.feed(data)
        except Exception:  # BufferFull: more than one message's worth, unread
            self._protocol_fault(worker, f"sent over {self._max_message} bytes in one message")
            return
        start = unpacker.tell()
        while True:
            try:
                message = next(unpacker)
            except StopIteration:
                return
            except Exception as err:  # not msgpack: FormatError, StackError, ExtraData, ...
                self._protocol_fault(worker, f"sent bytes that are not msgpack ({brief(err)})")
                return
            end = unpacker.tell()
            size, start = end - start, end
            if worker.state in _SILENCED:
                return  # a late word from an incarnation we already gave up on
            try:
                if size > self._max_message:
                    raise ProtocolError(f"sent {size} bytes in one message")
                if end != worker.fed and type(message) is dict and message.get("op") in _ENDS:
                    # A worker says nothing after its task's end until it gets the next job;
                    # more bytes would be words for a job this worker is about to be handed.
                    raise ProtocolError(f"wrote more after its {message['op']!r}")
                self._handle(worker, message)
            except ProtocolError as err:
                self._protocol_fault(worker, err.text)
                return

    def _handle(self, worker: Worker, raw: object) -> None:
        if type(raw) is not dict:
            raise ProtocolError(f"sent {brief(raw)}, not a map")
        message = FROM_WORKER.validate(raw)
        if message["gen"] != worker.gen:
            raise ProtocolError(f"said it is incarnation {message['gen']}, not {worker.gen}")
        if worker.state is WorkerState.DRAINING:
            if message["op"] in ("done", "failed"):
                self._drained(worker, message["job"], message.get("leftovers", []))
            elif message["op"] != "progress" or message["job"] != worker.draining:
                raise ProtocolError(f"sent {message['op']} while finishing a cancelled task")
            return
        match message["op"]:
            case "ready":
                self._on_ready(worker)
            case "boot_failed":
                if worker.state is not WorkerState.BOOTING:
                    raise ProtocolError("sent boot_failed after booting")
                self._last_boot_error = message["text"]
            case "progress":
                task = self._task_of(worker, message["job"])
                if not _taken(worker):
                    raise ProtocolError(
                        f"reported progress of job {message['job']} before taking it"
                    )
                self.listener.task_progress(task, message["progress"])
            case "done":
                task = self._finish(worker, message["job"], message.get("leftovers", []))
                self.listener.task_done(task, message["results"])
            case "failed":
                task = self._finish(worker, message["job"], message.get("leftovers", []))
                self.listener.task_failed(task, message["code"], message["text"], message["stack"])

    def _task_of(self, worker: Worker, job: int) -> Task:
        task = worker.task
        if task is None or task.job != job or worker.state is not WorkerState.BUSY:
            raise ProtocolError(f"spoke of job {job}, which it is not running")
        return task

    def _on_ready(self, worker: Worker) -> None:
        if worker.state is not WorkerState.BOOTING:
            if worker.state is WorkerState.RETIRING:
                return  # retired while booting (server stopping): it exits on EOF
            raise ProtocolError("said ready twice")
        if worker.exited:
            return  # died right after (a boot failure)
        worker.state = WorkerState.IDLE  # BOOTING -> IDLE
        self._boot_failures = 0
        if worker is self.standby:
            return  # waits, booted, until a slot needs it
        self._check_all_ready()
        self._idle.append(worker)
        self.listener.capacity_freed()

    def _finish(self, worker: Worker, job: int, leftovers: list[str]) -> Task:
        """The worker ended its task: back to idle, or retired if it is no longer clean."""
        task = self._task_of(worker, job)
        if not _taken(worker):
            raise ProtocolError(f"ended job {job} before taking it off its pipe")
        self._take_task(worker)
        worker.tasks_done += 1
        recycle = self.config.max_tasks_per_worker
        if leftovers:
            # A child session is a fresh session: a worker that kept a thread, a process or
            # a changed process setting from one task must not run another session's next.
            task_event(
                log,
                logging.WARNING,
                Event.WORKER_RETIRED,
                task,
                "worker %d retired: task s%d/t%d left behind %s",
                worker.pid,
                task.session.id,
                task.id,
                "; ".join(leftovers),
                worker=worker.pid,
            )
            self.retire(worker, "leftovers")
        elif worker.code != self.code or not self._owns_slot(worker):
            self.retire(worker, "reload")  # old code or settings, or its slot is gone
        elif recycle and worker.tasks_done >= recycle:
            log.info("worker %d retired after %d tasks", worker.pid, worker.tasks_done)
            self.retire(worker, "recycle")
        elif not worker.exited:  # its last word, read after its death: it takes no more work
            worker.state = WorkerState.IDLE  # BUSY -> IDLE
            self._idle.append(worker)
        return task

    def _protocol_fault(self, worker: Worker, what: str) -> None:
        if worker.state in _SILENCED:
            return
        text = f"worker {worker.pid} broke the pipe protocol: {what}"
        event(log, logging.ERROR, Event.PROTOCOL_FAULT, "%s; killed", text, worker=worker.pid)
        task = worker.task
        self._kill(worker, "protocol fault", "protocol")
        if task is not None:
            # A task it never took did not run there: it may run elsewhere, once.
            self.listener.task_lost(task, text, taken=worker.taken_at_kill)

    def _check_all_ready(self) -> None:
        waiter = self._ready_waiter
        if (
            waiter is not None
            and not waiter.done()
            and all(w is not None and w.state is not WorkerState.BOOTING for w in self.slots)
        ):
            waiter.set_result(None)

    # --- forking and replacing ----------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        """Fork a worker into ``slot``; if the OS refuses (no fds, no memory), retry later."""
        try:
            self._fork(slot)
        except OSError as err:
            self._fork_failures += 1
            delay = backoff(self._fork_failures)
            log.error("cannot start a worker in slot %d: %s; retrying in %.1f s", slot, err, delay)
            self.loop.call_later(delay, self._respawn_if_empty, slot)
            return
        self._fork_failures = 0

    def replace(self, slot: int) -> None:
        """Refill ``slot``: with the standby at once if it is ready, else by a fork on the next
        loop turn (so the caller's outcome goes out first)."""
        if self._stopping or slot >= len(self.slots):
            return  # stopping, or the slot went with a smaller Workers.Count
        standby = self.standby
        if slot == STANDBY:
            self.loop.call_later(STANDBY_REFILL_DELAY, self._respawn_if_empty, STANDBY)
        elif (
            standby is not None
            and standby.state is WorkerState.IDLE
            and not standby.exited
            and standby.code == self.code
        ):
            self.standby = None
            standby.slot = slot  # standby -> slot
            self.slots[slot] = standby
            self._idle.append(standby)
            self.loop.call_soon(self.listener.capacity_freed)
            self.loop.call_later(STANDBY_REFILL_DELAY, self._respawn_if_empty, STANDBY)
        else:
            self.loop.call_soon(self._respawn_if_empty, slot)

    def _fork(self, slot: int) -> Worker:
        opened: list[int] = []
        handler: logging.Handler | None = None

        def discard() -> None:
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if handler is not None:
                retire_worker_handler(handler)

        try:
            job_r, job_w = os.pipe()
            opened += (job_r, job_w)
            res_r, res_w = os.pipe()
            opened += (res_r, res_w)
            stack_r, stack_w = os.pipe()
            opened += (stack_r, stack_w)
            os.set_blocking(job_w, False)
            os.set_blocking(res_r, False)
            os.set_blocking(stack_r, False)
            self._gen += 1
            if self.log_handler_factory is not None:
                handler = self.log_handler_factory(f"pbt-worker-log-{slot}.{self._gen}")
            spec = WorkerSpec(
                slot=slot,
                gen=self._gen,
                job_r=job_r,
                res_w=res_w,
                close_fds=(job_w, res_r, stack_r, *self._inherited_fds()),
                stack_w=stack_w,
                keep_fds=self.image.keep_fds,
                broker_pid=os.getpid(),
                database=self.database,
                max_result_bytes=self.max_result_bytes,
                log_handler=handler,
                instance=self.instance,
                # Once the server runs, a database outage must not stop it: a replacement
                # boots anyway and its tasks fail with DB:ConnectionLost until it is back.
                database_required=not self._started,
            )
            # daemon=True: if the broker ever exits without stopping us, multiprocessing's
            # atexit terminates workers instead of joining them (a join would wait on our pipes).
            process = _MP.Process(
                target=run_worker, args=(spec,), name=f"pbt-worker-{slot}", daemon=True
            )
            process.start()
        except BaseException:
            discard()
            raise
        os.close(job_r)
        os.close(res_w)
        os.close(stack_w)
        opened = [job_w, res_r, stack_r]
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
            discard()
            raise
        unpacker = pipe_unpacker(self._max_message + (1 << 16))  # one message, one read more
        worker = Worker(slot, self._gen, process, pid, job_w, res_r, pidfd, unpacker, stack_r)
        worker.code = self.code
        worker.log_handler = handler
        if slot == STANDBY:
            self.standby = worker
        else:
            self.slots[slot] = worker
        self.loop.add_reader(res_r, self._on_readable, worker)
        self.loop.add_reader(pidfd, self._on_exit, worker)
        log.debug("worker %d (slot %d, gen %d) forked", pid, slot, worker.gen)
        return worker

    def _inherited_fds(self) -> list[int]:
        """Every fd a new worker must not hold: the other workers' pipes, pidfds, sentinels
        and log queues (holding a dead worker's queue open would keep its reader waiting)."""
        fds: list[int] = list(self.private_fds())
        for pipe, pidfd in self._trials.values():
            fds += (pipe, pidfd)
        for worker in self.workers():
            fds += (worker.job_w, worker.res_r, worker.stack_r, worker.pidfd)
            fds.append(worker.process.sentinel)
            if worker.log_handler is not None:
                fds += queue_fds(worker.log_handler)
        for handler in self._retiring:
            fds += queue_fds(handler)
        return [fd for fd in fds if fd >= 0]

    # --- ending workers -----------------------------------------------------------------------

    def _kill(self, worker: Worker, reason: str, cause: str = "") -> None:
        """SIGKILL the worker's whole tree now and put a fresh worker in its slot; ``cause``
        is counted (none for a stop, or for a retired worker: it was counted then)."""
        if worker.state in (WorkerState.KILLED, WorkerState.DEAD):
            return
        self._ended(cause)
        proctree.kill_tree(worker.pid, worker.pidfd)
        # Now that it can run nothing more: a job still unread was never started.
        worker.taken_at_kill = worker.task is not None and _taken(worker)
        # A retiring one was replaced already; the standby is replaced as a standby; a
        # draining one was to become the standby.
        owned_slot = worker is self.standby or self._owns_slot(worker)
        if worker.state is WorkerState.DRAINING:
            self.replace(STANDBY)
        self._detach(worker, WorkerState.KILLED)
        # A cancel's kill is a page's everyday business (a record change): DEBUG.
        log.log(
            logging.DEBUG if cause == "cancel" else logging.INFO,
            "worker %d killed (%s)",
            worker.pid,
            reason,
        )
        if owned_slot:
            self.replace(worker.slot)

    def retire(self, worker: Worker, cause: str = "") -> None:
        """Let a worker exit cleanly (its logs flush) and replace it."""
        self._ended(cause)
        self._detach(worker, WorkerState.RETIRING)
        # Whatever keeps a retired worker from exiting (a codeunit's stuck finalizer, say),
        # it does not get to run on: it has a deadline.
        self.loop.call_later(RETIRE_GRACE, self._kill_if_retiring, worker)
        self.replace(worker.slot)

    def _kill_if_retiring(self, worker: Worker) -> None:
        if worker.state is WorkerState.RETIRING and not worker.exited:
            self._kill(worker, f"retired, but still running after {RETIRE_GRACE:.0f} s")

    def _ended(self, cause: str) -> None:
        if cause and not self._stopping:
            self.ended[cause] += 1
            if self.on_worker_ended is not None:
                self.on_worker_ended(cause)

    def _detach(self, worker: Worker, state: WorkerState) -> None:
        """Take the worker out of its slot; it lives on in ``_others`` until reaped."""
        worker.state = state  # * -> KILLED | RETIRING | DEAD
        self._take_task(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        if worker is self.standby:
            self.standby = None
        elif self._owns_slot(worker):
            self.slots[worker.slot] = None
        self._others.add(worker)
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
        self._read_until_eof(worker)  # a result written just before death still counts
        taken = worker.task is not None and _taken(worker)
        self.loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        # Reap through multiprocessing (one reaper per child). Not join(0): that waits on
        # the sentinel pipe, which a forked grandchild may still hold; the pidfd already said
        # the process ended, so this waitpid returns at once.
        worker.process.join()
        code = worker.process.exitcode
        self.loop.remove_reader(worker.res_r)
        os.close(worker.res_r)
        dump_end, worker.dump_end = worker.dump_end, None
        rest = b""
        if dump_end is not None:  # what it wrote of its stack before it died
            with contextlib.suppress(OSError):
                rest = os.read(worker.stack_r, STACK_LIMIT)
        self.loop.remove_reader(worker.stack_r)
        os.close(worker.stack_r)
        self._close_job_pipe(worker)
        worker.process.close()
        if worker.log_handler is not None:
            # Its receiver thread wakes to end, and would take the GIL from the page's error.
            self._retiring.append(worker.log_handler)
            self.loop.call_later(AFTER_DEATH_DELAY, self._retire_log_handlers)
        previous = worker.state
        task = worker.task
        owned = worker is self.standby or self._owns_slot(worker)
        self._detach(worker, WorkerState.DEAD)
        self._others.discard(worker)
        self._reaped.set()
        self._reap_orphans_later()  # what the worker started is ours now (subreaper)
        if previous is WorkerState.DUMPING and owned and not self._stopping:
            self._ended("timeout")  # the slot needs a worker
            self.replace(worker.slot)
        if dump_end is not None:
            # Died while its stack was being taken (the timeout's kill never came): the
            # timeout ends its task now, not when the wait for the stack runs out.
            dump_end(rest, describe_exit(code))
        if previous is WorkerState.DUMPING:
            return
        if previous is WorkerState.DRAINING:
            self.replace(STANDBY)  # it was to become the standby
        if previous in _ENDED_BY_US or self._stopping:
            return
        how = describe_exit(code)
        if previous is WorkerState.BOOTING:
            self._ended("boot_failure")
            self._boot_failed(worker, code, how)
            return
        self._ended("crash")
        self.replace(worker.slot)
        if task is not None:  # its page is told first; the log line after (see logs.py)
            text = f"the child session's worker process {worker.pid} {how}"
            self.listener.task_lost(task, text, taken=taken)
        log.error("worker %d died: %s", worker.pid, how)

    def _retire_log_handlers(self) -> None:
        while self._retiring:
            retire_worker_handler(self._retiring.pop(0))

    def _read_until_eof(self, worker: Worker) -> None:
        while worker.state not in _SILENCED:
            try:
                data = os.read(worker.res_r, 1 << 16)
            except OSError:
                return
            if not data:
                return
            self._feed(worker, data)

    def _boot_failed(self, worker: Worker, code: int | None, how: str) -> None:
        reason = self._last_boot_error or how
        if code != EXIT_BOOT_FAILURE:
            reason = f"{reason} ({how})" if self._last_boot_error else how
        self._boot_failures += 1
        waiter = self._ready_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BootFailed(f"worker failed to boot: {reason}"))
            return
        if self._boot_failures >= BOOT_RETRY_LIMIT:
            self.listener.pool_broken(
                f"{self._boot_failures} workers in a row failed to boot; last: {reason}"
            )
            return
        delay = backoff(self._boot_failures)
        log.error("worker failed to boot (%s); retrying in %.1f s", reason, delay)
        self.loop.call_later(delay, self._respawn_if_empty, worker.slot)

    def _respawn_if_empty(self, slot: int) -> None:
        if self._stopping or slot >= len(self.slots):
            return
        if slot == STANDBY and any(w.state is WorkerState.DRAINING for w in self._others):
            return  # a worker finishing a cancelled task becomes the standby, or says so
        if (self.standby if slot == STANDBY else self.slots[slot]) is None:
            self._spawn(slot)

    def _owns_slot(self, worker: Worker) -> bool:
        slot = worker.slot
        return 0 <= slot < len(self.slots) and self.slots[slot] is worker

    def _reap_orphans_later(self) -> None:
        def reap(attempt: int) -> None:
            if proctree.reap_orphans(self.pids()) and attempt < 50:
                self.loop.call_later(0.02 * (attempt + 1), reap, attempt + 1)

        self.loop.call_later(AFTER_DEATH_DELAY, reap, 0)

    def _sweep(self) -> None:
        """Every few seconds: kill what escaped a live worker's tree (a ``setsid`` daemon
        reparents to us as soon as its own parent exits, long before the worker dies)."""
        proctree.reap_orphans(self.pids())
        if not self._stopping:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def _all_reaped(self) -> None:
        while self._others:
            self._reaped.clear()
            await self._reaped.wait()
