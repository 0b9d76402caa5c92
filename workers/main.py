"""The worker process: one child session at a time, blocking, no event loop.

Forked by the broker's pool (``multiprocessing`` fork context). Lifecycle::

    prologue (signals, fds, die-with-broker, own process group, child-session marker)
    open the database read-only  --fails-->  "boot_failed" + exit EXIT_BOOT_FAILURE
    take the process baseline; "ready"
    loop: read "run" -> codeunit(ctx) -> check leftovers -> "done" | "failed"
          (nothing is said at the start: the job gone from the pipe is the ack)
    EOF on the job pipe (the broker closed it) -> return normally, so log records flush

A reload's trial process (:func:`run_trial`) runs the same prologue, imports the new code
afresh, opens the database, says ``tried`` with the codeunits it found, and exits; only
then does the broker import that code for the workers it forks next.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from pbt_server.codeunits import (
    CHILD_SESSION_VARIABLE,
    ChildSession,
    lookup,
    module_files,
    registered,
    reimport,
)
from pbt_server.config import DatabaseSection
from pbt_server.errors import ChildSessionCode, CodeunitError, UnknownCodeunit
from pbt_server.proctree import shared_fds
from pbt_server.protocol import MAX_PROGRESS, MAX_TEXT, Run, pack, pipe_unpacker
from workers.cleanliness import Baseline
from workers.database import DatabaseUnavailable, error_code, open_database
from workers.dbapi import Database

EXIT_BOOT_FAILURE: Final = 3  # reserved: the pool stops respawning instead of looping
STACK_SIGNAL: Final = signal.SIGUSR2  # the broker's "dump your stacks", before a timeout kill
_PR_SET_PDEATHSIG: Final = 1
_CODE_LIMIT: Final = 200  # characters of an error code a codeunit sets itself
PROGRESS_GAP: Final = 0.010  # seconds between two progress messages of a task, at least

log = logging.getLogger("pbt_server.worker")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, fixed at fork time."""

    slot: int
    gen: int
    job_r: int
    res_w: int
    close_fds: tuple[int, ...]
    keep_fds: frozenset[int]  # open before the broker started serving: codeunit modules'
    broker_pid: int
    database: DatabaseSection
    max_result_bytes: int
    log_handler: logging.Handler | None  # multiprocessing-logging's handler, built by the broker
    instance: str = ""  # names this broker run; processes below a worker carry it
    stack_w: int = -1  # where a stack dump goes when the broker asks (its task timed out)
    database_required: bool = True  # the first workers fail to boot without their database
    # A reload's trial: the [Codeunits] Modules to import afresh, and the module prefixes
    # whose copies inherited from the broker (the old code) are forgotten first.
    modules: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a forked worker process."""
    _prologue(spec)
    db = _boot(spec, required=spec.database_required)
    baseline = _watch_forks(spec)
    baseline.take()
    _write(spec.res_w, {"op": "ready", "gen": spec.gen, "pid": os.getpid()})
    unpacker = pipe_unpacker()
    while data := os.read(spec.job_r, 1 << 16):
        unpacker.feed(data)
        for message in unpacker:
            _run_job(spec, db, baseline, message)
    # EOF: the broker retired us or is stopping. Returning (not os._exit) lets
    # multiprocessing join the logging queue's feeder thread, so our records arrive.


def run_trial(spec: WorkerSpec) -> None:
    """Entry point of a reload's trial process: import, open the database, report, exit."""
    _prologue(spec)
    _boot(spec, required=True)  # its connection closes when the process exits
    ids = sorted(registered())
    _write(spec.res_w, {"op": "tried", "gen": spec.gen, "codeunits": ids, "files": _files(spec)})


def _files(spec: WorkerSpec) -> list[str]:
    return [f for f in module_files(spec.prefixes) if len(f) <= MAX_TEXT]


def _boot(spec: WorkerSpec, *, required: bool) -> Database:
    """The new code (after a reload), then the database; on failure say why and exit."""
    try:
        if spec.modules:
            reimport(spec.modules, spec.prefixes)
        return open_database(spec.database, required=required)
    except (ImportError, DatabaseUnavailable) as err:
        _write(spec.res_w, {"op": "boot_failed", "gen": spec.gen, "text": str(err)})
        os._exit(EXIT_BOOT_FAILURE)


def _prologue(spec: WorkerSpec) -> None:
    # The broker's asyncio loop installed handlers and a wakeup fd; inherited, they would make
    # a SIGTERM sent to this worker run the broker's handler (python/cpython#94454).
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the broker; it stops us
    signal.set_wakeup_fd(-1)
    if spec.log_handler is not None:
        # Our records go to the broker's log through multiprocessing-logging's queue; the
        # broker's own queue handler (and its listener thread) did not survive the fork.
        spec.log_handler.addFilter(_in_task)
        logging.getLogger().handlers = [spec.log_handler]
    _close_inherited(spec.close_fds, spec.keep_fds)
    # Die with the broker, even if it is SIGKILLed: orphaned workers would hold pipes forever.
    _die_with_parent()
    if os.getppid() != spec.broker_pid:
        os._exit(1)  # the broker died before prctl took effect
    # Own process group: the watchdog kills the whole tree with killpg. PermissionError: the
    # broker already moved us (it calls setpgid too, to close the race).
    with contextlib.suppress(PermissionError):
        os.setpgid(0, 0)
    if spec.stack_w >= 0:
        # Before a timeout kill the broker asks for the stuck code's stack: faulthandler's
        # handler is C code, so it answers even while Python is busy in a long loop.
        faulthandler.register(STACK_SIGNAL, file=spec.stack_w, all_threads=True)
    # Marks this process and everything a codeunit starts as a child session: the client
    # refuses to connect from here, and the next start finds what a killed broker left.
    os.environ[CHILD_SESSION_VARIABLE] = spec.instance or str(spec.broker_pid)


_current: dict[str, Any] = {}  # the task this worker runs, for its log records


def _in_task(record: logging.LogRecord) -> bool:
    """Tag a record logged during a task with the task (the server log says whose it is)."""
    if _current:
        record.pbt = {**_current, "worker": os.getpid(), "in_task": True}
    return True


def _watch_forks(spec: WorkerSpec) -> Baseline:
    """Make a forked copy of this worker harmless, and remember that a task forked.

    A process forked from a worker (``os.fork``, a double-forked daemon) would otherwise hold
    the job and result pipes: it could read another session's jobs and answer them. Its
    first act is to close them. Programs started with ``subprocess`` never get them: the
    pipes are close-on-exec.
    """
    handler = spec.log_handler
    feeder = getattr(getattr(handler, "queue", None), "_thread", None)

    def ignore(thread: object) -> bool:
        # multiprocessing-logging's queue starts its feeder thread on the first record.
        queue = getattr(handler, "queue", None)
        return thread is feeder or thread is getattr(queue, "_thread", None)

    baseline = Baseline(ignore_thread=ignore)

    def in_child() -> None:
        for fd in (spec.job_r, spec.res_w, spec.stack_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        # Die with the process that forked us, as the worker dies with the broker: a forked
        # copy carries no child-session mark in /proc (that is the exec's environment), so
        # the next start could not find it.
        _die_with_parent()

    def in_parent() -> None:
        baseline.forked = True

    os.register_at_fork(after_in_child=in_child, after_in_parent=in_parent)
    return baseline


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_libc: Final = ctypes.CDLL(None, use_errno=True)


def _close_inherited(fds: tuple[int, ...], keep_fds: frozenset[int]) -> None:
    """Close the broker's fds: other workers' pipes, every socket the broker opened to serve
    (listeners, clients: a client would see no EOF while we held its socket), and its event
    loop's epoll and other anonymous inodes (a codeunit could register fds on the broker's
    epoll and make it spin). What existed before, opened by codeunit modules at import,
    stays: their Python objects still own those fd numbers."""
    for fd in fds:
        _close(fd)
    for fd in shared_fds() - keep_fds:
        _close(fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _run_job(spec: WorkerSpec, db: Database, baseline: Baseline, job: Run) -> None:
    ctx = ChildSession(
        parameters=MappingProxyType(dict(job["parameters"])),
        db=db,
        task_id=job["task"],
        session_id=job["session"],
        record_id=job["record"],
        codeunit_id=job["codeunit"],
        deadline=time.monotonic() + job["timeout"] / 1000,
        log=logging.getLogger(f"codeunit.{job['codeunit']}"),
        context=MappingProxyType(dict(job["context"])),
        report_progress=_ProgressWriter(spec, job["job"]),
    )
    _current.update(session=job["session"], task=job["task"], codeunit=job["codeunit"])
    try:
        reply = _call_codeunit(ctx)
    finally:
        _current.clear()
    if spec.stack_w >= 0:
        # Again after every task (2 µs): a codeunit that reset the signal's handler (Python
        # cannot see faulthandler's) would otherwise make the next dump end the worker.
        # Only a fresh registration installs the handler again.
        faulthandler.unregister(STACK_SIGNAL)
        faulthandler.register(STACK_SIGNAL, file=spec.stack_w, all_threads=True)
    leftovers = baseline.leftovers()
    if leftovers:
        reply["leftovers"] = leftovers
    reply["gen"] = spec.gen
    reply["job"] = job["job"]
    _write_bytes(spec.res_w, _packed(reply, spec.max_result_bytes))


class _ProgressWriter:
    """A task's ``ctx.set_progress``: at most one message per :data:`PROGRESS_GAP` leaves
    the worker (a loop that reports every row must not flood the broker); the rest drop."""

    __slots__ = ("gen", "job", "last", "res_w")

    def __init__(self, spec: WorkerSpec, job: int) -> None:
        self.res_w, self.gen, self.job = spec.res_w, spec.gen, job
        self.last = -PROGRESS_GAP

    def __call__(self, progress: dict[str, str]) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_GAP:
            return
        data = pack({"op": "progress", "gen": self.gen, "job": self.job, "progress": progress})
        if len(data) > MAX_PROGRESS:
            raise ValueError(f"progress is {len(data)} bytes packed; at most {MAX_PROGRESS}")
        self.last = now
        _write_bytes(self.res_w, data)


def _call_codeunit(ctx: ChildSession) -> dict[str, Any]:
    entry = lookup(ctx.codeunit_id)
    if entry is None:  # the broker checks at enqueue; this is a registry out of step
        return _failure(UnknownCodeunit.code, f"codeunit {ctx.codeunit_id} is not registered", "")
    try:
        results = entry.function(ctx)
    except BaseException as exc:
        stack = traceback.format_exc()
        if isinstance(exc, CodeunitError):
            code = exc.code if type(exc.code) is str else type(exc).__name__
            return _failure(code[:_CODE_LIMIT], str(exc.text), stack)
        return _failure(error_code(exc) or type(exc).__name__, str(exc), stack)
    finally:
        _end_task(ctx.db)
    return _checked_results(results)


def _checked_results(results: object) -> dict[str, Any]:
    if results is None:
        return _done({})
    if not isinstance(results, Mapping):
        return _invalid(f"codeunit returned {type(results).__name__}; expected dict[str, str]")
    try:
        # Check the copy that will be sent: a Mapping (or a dict subclass) may answer
        # items() differently from what a copy of it holds.
        copy = dict(results)
    except Exception as err:
        return _invalid(f"codeunit returned a mapping that cannot be read: {err!r:.200}")
    for key, value in copy.items():
        if type(key) is not str or type(value) is not str:
            return _invalid(
                f"result entry {key!r:.60}: {type(value).__name__:.40} is not str -> str"
            )
    return _done(copy)


# A task's reply: a Done or TaskFailure message, given its gen and job just before packing.
def _done(results: dict[str, str]) -> dict[str, Any]:
    return {"op": "done", "results": results}


def _failure(code: str, text: str, stack: str) -> dict[str, Any]:
    return {"op": "failed", "code": code[:MAX_TEXT], "text": text, "stack": stack}


def _invalid(text: str) -> dict[str, Any]:
    return _failure(ChildSessionCode.INVALID_RESULT, text, "")


def _packed(reply: dict[str, Any], limit: int) -> bytes:
    """The reply packed, within ``limit`` bytes, whatever the codeunit returned or raised."""
    try:
        data = pack(reply)
    except (ValueError, TypeError, OverflowError) as err:  # e.g. a lone surrogate in a str
        if reply["op"] == "done":
            data = pack(_reframe(reply, _invalid(f"result cannot be packed: {err}")))
        else:
            failure = _failure(_safe(reply["code"]), _safe(reply["text"]), _safe(reply["stack"]))
            data = pack(_reframe(reply, failure))
    if len(data) <= limit:
        return data
    if reply["op"] == "done":
        text = f"result is {len(data)} bytes packed; the limit is {limit} bytes"
        return pack(_reframe(reply, _invalid(text)))
    # An error too large to send: keep its code, trim its text and stack to fit.
    room = max(limit // 2 - 512, 64)
    trimmed = _failure(reply["code"], _safe(reply["text"])[:room], _safe(reply["stack"])[-room:])
    return pack(_reframe(reply, trimmed))


def _reframe(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for name in ("gen", "job", "leftovers"):
        if name in old:
            new[name] = old[name]
    return new


def _safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _end_task(db: Database) -> None:
    # Each task runs in its own read transaction; never let one leak into the next.
    try:
        db.end_task()
    except Exception:
        log.debug("ending the task's database reads failed", exc_info=True)


def _write(fd: int, message: Mapping[str, Any]) -> None:
    _write_bytes(fd, pack(message))


def _write_bytes(fd: int, payload: bytes) -> None:
    data = memoryview(payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]
