"""The worker process: one child session at a time, blocking, no event loop.

Forked by the broker's pool (``multiprocessing`` fork context). Lifecycle::

    prologue (signals, fds, die-with-broker, own process group)
    open the database read-only  --fails-->  "boot_failed" + exit EXIT_BOOT_FAILURE
    "ready"
    loop: read "run" -> "started" -> codeunit(ctx) -> "done" | "failed"
    EOF on the job pipe (the broker closed it) -> return normally, so log records flush
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import stat
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pbt_server.errors import TASK_INVALID_RESULT, CodeunitError
from pbt_server.protocol import pack, pipe_unpacker
from workers.context import ChildSession
from workers.database import DatabaseUnavailable, open_database, write_denied_code
from workers.registry import lookup

EXIT_BOOT_FAILURE = 3  # reserved: the pool stops respawning instead of looping (gunicorn's rule)
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("pbt_server.worker")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, fixed at fork time."""

    slot: int
    gen: int
    job_r: int
    res_w: int
    close_fds: tuple[int, ...]
    keep_sockets: frozenset[int]  # open before the broker started serving: codeunit modules'
    broker_pid: int
    database_url: str
    max_result_bytes: int
    log_handler: logging.Handler | None  # multiprocessing-logging's handler, built by the broker


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a forked worker process."""
    _prologue(spec)
    try:
        db = open_database(spec.database_url)
    except DatabaseUnavailable as err:
        _write(spec.res_w, {"op": "boot_failed", "gen": spec.gen, "text": str(err)})
        os._exit(EXIT_BOOT_FAILURE)
    _write(spec.res_w, {"op": "ready", "gen": spec.gen, "pid": os.getpid()})
    unpacker = pipe_unpacker()
    while data := os.read(spec.job_r, 1 << 16):
        unpacker.feed(data)
        for message in unpacker:
            _run_job(spec, db, message)
    # EOF: the broker retired us or is stopping. Returning (not os._exit) lets
    # multiprocessing join the logging queue's feeder thread, so our records arrive.


def _prologue(spec: WorkerSpec) -> None:
    # The broker's asyncio loop installed handlers and a wakeup fd; inherited, they would make
    # a SIGTERM sent to this worker run the broker's handler (cpython #94454, package-notes §2).
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the broker; it stops us
    signal.set_wakeup_fd(-1)
    if spec.log_handler is not None:
        # Our records go to the broker's log through multiprocessing-logging's queue; the
        # broker's own queue handler (and its listener thread) did not survive the fork.
        logging.getLogger().handlers = [spec.log_handler]
    _close_inherited(spec.close_fds, spec.keep_sockets)
    # Die with the broker, even if it is SIGKILLed: orphaned workers would hold pipes forever.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec.broker_pid:
        os._exit(1)  # the broker died before prctl took effect
    # Own process group: the watchdog kills the whole tree with killpg. PermissionError: the
    # broker already moved us (it calls setpgid too, to close the race).
    with contextlib.suppress(PermissionError):
        os.setpgid(0, 0)


def _close_inherited(fds: tuple[int, ...], keep_sockets: frozenset[int]) -> None:
    """Close the broker's fds: other workers' pipes, and every socket the broker opened to
    serve (listeners, clients: a client would see no EOF while we held its socket). Sockets
    that existed before, opened by codeunit modules at import, stay: their Python objects
    still own those fd numbers."""
    for fd in fds:
        _close(fd)
    for fd in socket_fds() - keep_sockets:
        _close(fd)


def socket_fds() -> set[int]:
    """The fds of this process that are sockets."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                found.add(fd)
        except OSError:
            continue
    return found


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _run_job(spec: WorkerSpec, db: Any, message: Mapping[str, Any]) -> None:
    job = message["job"]
    _write(spec.res_w, {"op": "started", "gen": spec.gen, "job": job})
    ctx = ChildSession(
        parameters=MappingProxyType(dict(message["parameters"])),
        db=db,
        task_id=message["task"],
        session_id=message["session"],
        record_id=message["record"],
        codeunit_id=message["codeunit"],
        deadline=time.monotonic() + message["timeout"] / 1000,
        log=logging.getLogger(f"codeunit.{message['codeunit']}"),
    )
    reply = _call_codeunit(ctx)
    reply["gen"] = spec.gen
    reply["job"] = job
    data = pack(reply)
    if len(data) > spec.max_result_bytes:
        reply = _failure(
            TASK_INVALID_RESULT,
            f"result is {len(data)} bytes packed; the limit is {spec.max_result_bytes} bytes",
            "",
        )
        reply["gen"] = spec.gen
        reply["job"] = job
        data = pack(reply)
    _write_bytes(spec.res_w, data)
    _reap_children()


def _call_codeunit(ctx: ChildSession) -> dict[str, Any]:
    entry = lookup(ctx.codeunit_id)
    if entry is None:  # the broker checks at enqueue; this is a registry out of step
        return _failure("UnknownCodeunit", f"codeunit {ctx.codeunit_id} is not registered", "")
    try:
        results = entry.function(ctx)
    except BaseException as exc:
        stack = traceback.format_exc()
        if isinstance(exc, CodeunitError):
            return _failure(exc.code, exc.text, stack)
        code = write_denied_code(exc) or type(exc).__name__
        return _failure(code, str(exc), stack)
    finally:
        _rollback(ctx.db)
    return _validate_results(results)


def _validate_results(results: object) -> dict[str, Any]:
    if results is None:
        results = {}
    if not isinstance(results, Mapping):
        return _failure(
            TASK_INVALID_RESULT,
            f"codeunit returned {type(results).__name__}; expected dict[str, str] or None",
            "",
        )
    for key, value in results.items():
        if type(key) is not str or type(value) is not str:
            return _failure(
                TASK_INVALID_RESULT,
                f"result entry {key!r:.60}: {type(value).__name__:.40} is not str -> str",
                "",
            )
    return {"op": "done", "results": dict(results)}


def _failure(code: str, text: str, stack: str) -> dict[str, Any]:
    return {"op": "failed", "code": code, "text": text, "stack": stack}


def _rollback(db: Any) -> None:
    # Each task runs in its own read transaction; never let one leak into the next.
    try:
        if db.in_transaction:
            db.rollback()
    except Exception:
        log.debug("rollback after task failed", exc_info=True)


def _reap_children() -> None:
    """Kill what a codeunit left running: a finished child session leaves nothing behind."""
    try:
        # ~1 µs, against ~30 µs for the /proc scan below: ECHILD means no child at all.
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return
    try:
        tasks = os.listdir("/proc/self/task")
        children = [
            pid for tid in tasks for pid in _read_children(f"/proc/self/task/{tid}/children")
        ]
    except OSError:
        return
    if not children:
        return
    import psutil  # only on this rare path

    me = psutil.Process()
    for proc in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(me.children(), timeout=1)


def _read_children(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def _write(fd: int, message: Mapping[str, Any]) -> None:
    _write_bytes(fd, pack(message))


def _write_bytes(fd: int, payload: bytes) -> None:
    data = memoryview(payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]
