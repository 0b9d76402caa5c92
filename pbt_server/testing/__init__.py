"""Testing codeunits and the pages that use them, for an application's own test suite.

Business Central's ``TestPage.RunPageBackgroundTask`` runs a page's background task in a test.
Here:

- :func:`run_page_background_task` runs one codeunit as a child session — in a forked
  worker process with the real worker's prologue, a read-only ``ctx.db``, the same result
  checks and error codes — and returns its results or raises :class:`BackgroundTaskError`.
- :class:`ServerProcess` runs a real broker for your own modules and database, and the
  pytest plugin (``pbt_server.testing.plugin``, registered as an entry point) gives a test a
  connected session with the ``pbt_server`` fixture.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from pbt_server import proctree
from pbt_server.codeunits import load_modules
from pbt_server.config import DatabaseSection, load_config
from pbt_server.errors import (
    TASK_TIMEOUT_TEXT,
    BackgroundTaskError,
    ChildSessionCode,
    InvalidParameters,
    UnknownCodeunit,
)
from pbt_server.protocol import DEFAULT_MAX_FRAME, FROM_WORKER, Run, pack, pipe_unpacker
from pbt_server.testing.server import ServerProcess
from workers.main import WorkerSpec, run_worker

__all__ = ["ServerProcess", "run_page_background_task"]

_FORK: Final = multiprocessing.get_context("fork")
_BOOT_TIMEOUT: Final = 30.0


def run_page_background_task(
    codeunit_id: int,
    parameters: Mapping[str, str] | None = None,
    *,
    database_url: str,
    record_id: str = "",
    context: Mapping[str, str] | None = None,
    modules: Iterable[str] = (),
    timeout: int = 120_000,
    on_progress: Callable[[dict[str, str]], object] | None = None,
) -> dict[str, str]:
    """Run codeunit ``codeunit_id`` once, as a child session, and return its results.

    Args:
        codeunit_id: the registered codeunit to run.
        parameters: its ``ctx.parameters`` (text to text).
        database_url: what ``ctx.db`` opens read-only, as ``[Database] Url`` (relative
            SQLite paths resolve against the current directory).
        record_id: ``ctx.record_id``.
        context: ``ctx.context``.
        modules: codeunit modules to import first (those already imported count too).
        timeout: milliseconds before the child session is killed.
        on_progress: called with each value the codeunit's ``ctx.set_progress`` sends (in
            this process, not rate-limited beyond the worker's own 10 ms gap).

    Raises:
        BackgroundTaskError: the codeunit failed (``.code``: the exception's class name, its
            ``CodeunitError`` code, ``DB:WriteDenied``, ``ChildSessionTaskTimeout``, ...).
        UnknownCodeunit: no codeunit has that id.
        InvalidParameters: parameters are not text to text.
    """
    registry = load_modules(modules)
    if codeunit_id not in registry:
        raise UnknownCodeunit(f"codeunit {codeunit_id} is not registered")
    checked = {} if parameters is None else dict(parameters)
    if not all(type(k) is str and type(v) is str for k, v in checked.items()):
        raise InvalidParameters("parameters must map text to text")
    database = _database(database_url)
    job: Run = {
        "op": "run",
        "job": 1,
        "codeunit": codeunit_id,
        "parameters": checked,
        "task": 1,
        "session": 1,
        "record": record_id,
        "timeout": timeout,
        "context": dict(context or {}),
    }
    reply = _run_in_a_worker(job, database, timeout / 1000, on_progress)
    if reply["op"] == "done":
        return dict(reply["results"])
    raise BackgroundTaskError(
        reply["text"], code=reply["code"], call_stack=reply["stack"], task_id=1
    )


def _database(url: str) -> DatabaseSection:
    return load_config(None, environ={"PBT_DATABASE_URL": url}).database


def _run_in_a_worker(
    job: Run,
    database: DatabaseSection,
    seconds: float,
    on_progress: Callable[[dict[str, str]], object] | None,
) -> dict[str, Any]:
    job_r, job_w = os.pipe()
    res_r, res_w = os.pipe()
    spec = WorkerSpec(
        slot=0,
        gen=1,
        job_r=job_r,
        res_w=res_w,
        close_fds=(job_w, res_r),
        keep_fds=frozenset(proctree.shared_fds()),
        broker_pid=os.getpid(),
        database=database,
        max_result_bytes=DEFAULT_MAX_FRAME - 256,
        log_handler=None,
    )
    # daemon: a worker never outlives this process, even if the test is interrupted
    process = _FORK.Process(target=run_worker, args=(spec,), name="pbt-test-worker", daemon=True)
    process.start()
    os.close(job_r)
    os.close(res_w)
    try:
        messages = _Messages(res_r)
        first = messages.next(_BOOT_TIMEOUT)
        if first["op"] == "boot_failed":
            raise BackgroundTaskError(first["text"], code=ChildSessionCode.DB_CONNECTION_LOST)
        os.write(job_w, pack(job))
        deadline = time.monotonic() + seconds  # from the hand-over, as the broker counts
        os.close(job_w)
        job_w = -1
        try:
            while (reply := messages.next(deadline - time.monotonic()))["op"] == "progress":
                if on_progress is not None:
                    on_progress(dict(reply["progress"]))
            return reply
        except TimeoutError:
            assert process.pid is not None
            pidfd = os.pidfd_open(process.pid)
            try:
                proctree.kill_tree(process.pid, pidfd)
            finally:
                os.close(pidfd)
            raise BackgroundTaskError(
                TASK_TIMEOUT_TEXT, code=ChildSessionCode.TASK_TIMEOUT, task_id=1
            ) from None
    finally:
        if job_w >= 0:
            os.close(job_w)
        process.join(_BOOT_TIMEOUT)
        if process.is_alive():
            os.kill(process.pid or 0, signal.SIGKILL)
            process.join()
        process.close()
        os.close(res_r)


class _Messages:
    """The worker's messages, validated as the broker validates them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.unpacker = pipe_unpacker()

    def next(self, seconds: float) -> dict[str, Any]:
        import select

        deadline = time.monotonic() + seconds
        while True:
            try:
                return dict(FROM_WORKER.validate(next(self.unpacker)))
            except StopIteration:
                pass  # no whole message yet
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise TimeoutError
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise BackgroundTaskError(
                    "the child session's worker process ended without an answer",
                    code=ChildSessionCode.CRASHED,
                )
            self.unpacker.feed(data)
