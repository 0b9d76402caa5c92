"""Codeunits for the chaos harness (scripts/chaos.py): one codeunit, many ways to end, and
the shared ones.

Every run reports the identity it was given (the parameters) and the identity the broker
gave it (``ctx.task_id``, ``ctx.session_id``, ``ctx.record_id``), so the harness can check
that each outcome reached the task, page and session that enqueued it. The ``mode``
parameter picks the behaviour:

========== =========================================================== ==================
mode       does                                                        expected outcome
========== =========================================================== ==================
fast       returns at once                                             completed
sleep      sleeps ``ms`` milliseconds                                  completed
spin       burns CPU until the watchdog kills it                       TaskTimeout
exit       ``os._exit(ms % 256 or 7)``                                 Crashed
raise      raises ``CodeunitError`` whose text names the task          CHAOS:Raised
spawn      starts ``sleep 600``, then returns (the worker must kill    completed
           it)
spawn_spin starts ``sleep 600``, then spins                            TaskTimeout
spawn_exit starts ``sleep 600``, then ``os._exit``                     Crashed
escape     double-forks a ``setsid`` grandchild, then spins (the       TaskTimeout
           broker, a subreaper, must kill and reap it)
escape_done double-forks a ``setsid`` grandchild, then returns          completed
progress   ``ctx.set_progress`` in a loop of ``steps`` steps of ``ms`` each   completed
========== =========================================================== ==================

Every completing run also returns ``gen``: the generation of this module's code, read at
import from the file ``$PBT_CHAOS_GENERATION`` names (the harness writes it before each
reload), so the harness can tell old code from new.

The shared codeunits (``@codeunit(..., shared=True)``: ``CHAOS_SHARED``, ``CHAOS_PER_CONTEXT``
with ``per_context=True``, ``CHAOS_CACHED`` with ``cache=True``) run the modes ``fast``,
``sleep``, ``progress``, ``raise``, ``spin`` and ``exit`` of one *execution*, which many
pages' tasks attach to. What they return identifies the execution rather than a page: a
``run`` nonce drawn when the codeunit starts, the worker's ``pid``, the data ``version`` it
read from the table ``chaos_meta`` (which only the harness writes), ``began`` and
``ended`` (``time.monotonic()`` at its start, before its first statement, and at its end:
the system-wide clock the harness and its clients read too) and the ``user`` of the context
it saw. Their progress and their error texts carry the ``run`` nonce as well.

Spawned processes are recorded in ``<pids>/<token>.<n>`` as ``"pid starttime"`` (the
starttime from ``/proc/<pid>/stat`` tells a reused pid apart).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from workers import ChildSession, CodeunitError, codeunit

CHAOS = 1000
CHAOS_VICTIM = 1001  # the same codeunit for victim clients: their tasks count apart in metrics
CHAOS_SHARED = 1002
CHAOS_PER_CONTEXT = 1003
CHAOS_CACHED = 1004
SHARED_CODEUNITS = (CHAOS_SHARED, CHAOS_PER_CONTEXT, CHAOS_CACHED)
RAISED_CODE = "CHAOS:Raised"
GENERATION_VARIABLE = "PBT_CHAOS_GENERATION"

MODES = (
    "fast",
    "sleep",
    "spin",
    "exit",
    "raise",
    "spawn",
    "spawn_spin",
    "spawn_exit",
    "escape",
    "escape_done",
    "progress",
)
SHARED_MODES = ("fast", "sleep", "progress", "raise", "spin", "exit")


def _generation() -> str:
    path = os.environ.get(GENERATION_VARIABLE)
    if not path:
        return "0"
    try:
        with open(path) as f:
            return f.read().strip() or "0"
    except OSError:
        return "0"


GENERATION = _generation()  # read when this module is imported (at start and each reload)


def starttime(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``: clock ticks after boot when ``pid`` started."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _record_child(ctx: ChildSession, pid: int, n: int) -> None:
    directory = ctx.parameters.get("pids")
    if not directory:
        return
    path = os.path.join(directory, f"{ctx.parameters.get('token', 'x')}.{n}")
    try:
        started = starttime(pid)
    except (OSError, ValueError, IndexError):
        started = -1
    with open(path + ".tmp", "w") as f:
        f.write(f"{pid} {started}")
    os.rename(path + ".tmp", path)


def _spawn(ctx: ChildSession) -> None:
    child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    _record_child(ctx, child.pid, 0)


def _escape(ctx: ChildSession) -> None:
    # sh starts a setsid'd sleep in the background and exits: the sleep leaves the worker's
    # process group and session, and is orphaned (reparented to the nearest subreaper).
    shell = subprocess.run(
        ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    _record_child(ctx, int(shell.stdout.strip()), 1)


def _spin() -> None:
    x = 0
    while True:
        x += 1


def identity(ctx: ChildSession) -> dict[str, str]:
    """The results every completing mode returns: what it was given and what it saw."""
    results = dict(ctx.parameters)
    results["ctx_task"] = str(ctx.task_id)
    results["ctx_session"] = str(ctx.session_id)
    results["ctx_record"] = ctx.record_id
    results["gen"] = GENERATION
    return results


def _progress_loop(ctx: ChildSession, tag: dict[str, str]) -> None:
    steps = int(ctx.parameters.get("steps", "5"))
    ms = int(ctx.parameters.get("ms", "10"))
    for step in range(1, steps + 1):
        time.sleep(ms / 1000)
        ctx.set_progress({**tag, "step": str(step), "of": str(steps)})


@codeunit(CHAOS, name="Chaos")
def chaos(ctx: ChildSession) -> dict[str, str]:
    mode = ctx.parameters.get("mode", "fast")
    ms = int(ctx.parameters.get("ms", "0"))
    if mode == "sleep":
        time.sleep(ms / 1000)
    elif mode == "spin":
        _spin()
    elif mode == "exit":
        os._exit(ms % 256 or 7)
    elif mode == "raise":
        raise CodeunitError(
            f"raised by {ctx.parameters.get('token')} (task {ctx.task_id})", code=RAISED_CODE
        )
    elif mode == "spawn":
        _spawn(ctx)
    elif mode == "spawn_spin":
        _spawn(ctx)
        _spin()
    elif mode == "spawn_exit":
        _spawn(ctx)
        os._exit(9)
    elif mode == "escape":
        _escape(ctx)
        _spin()
    elif mode == "escape_done":
        _escape(ctx)
    elif mode == "progress":
        _progress_loop(ctx, {"token": ctx.parameters.get("token", "")})
    elif mode != "fast":
        raise CodeunitError(f"unknown chaos mode {mode!r}", code="CHAOS:BadMode")
    return identity(ctx)


@codeunit(CHAOS_VICTIM, name="ChaosVictim")
def chaos_victim(ctx: ChildSession) -> dict[str, str]:
    return chaos(ctx)


def shared_run(ctx: ChildSession) -> dict[str, str]:
    """One execution of a shared chaos codeunit; its results say which execution it was."""
    began = time.monotonic()
    run = uuid.uuid4().hex[:16]
    (version,) = ctx.db.execute("SELECT version FROM chaos_meta").fetchone()
    mode = ctx.parameters.get("mode", "fast")
    ms = int(ctx.parameters.get("ms", "0"))
    if mode == "sleep":
        time.sleep(ms / 1000)
    elif mode == "progress":
        _progress_loop(ctx, {"run": run})
    elif mode == "raise":
        raise CodeunitError(
            f"raised by shared run {run} (execution {ctx.task_id})", code=RAISED_CODE
        )
    elif mode == "spin":
        _spin()
    elif mode == "exit":
        os._exit(ms % 256 or 7)
    elif mode != "fast":
        raise CodeunitError(f"unknown shared chaos mode {mode!r}", code="CHAOS:BadMode")
    results = dict(ctx.parameters)
    results.update(
        ctx_task=str(ctx.task_id),
        ctx_session=str(ctx.session_id),
        ctx_record=ctx.record_id,
        gen=GENERATION,
        run=run,
        pid=str(os.getpid()),
        version=str(version),
        user=ctx.context.get("user", ""),
        began=repr(began),
        ended=repr(time.monotonic()),
    )
    return results


@codeunit(CHAOS_SHARED, name="ChaosShared", shared=True)
def chaos_shared(ctx: ChildSession) -> dict[str, str]:
    return shared_run(ctx)


@codeunit(CHAOS_PER_CONTEXT, name="ChaosPerContext", shared=True, per_context=True)
def chaos_per_context(ctx: ChildSession) -> dict[str, str]:
    return shared_run(ctx)


@codeunit(CHAOS_CACHED, name="ChaosCached", shared=True, cache=True)
def chaos_cached(ctx: ChildSession) -> dict[str, str]:
    return shared_run(ctx)
