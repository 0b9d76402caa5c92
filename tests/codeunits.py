"""Codeunits the tests run: well-behaved and misbehaving, at module level (pebble's habit)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from workers import ChildSession, CodeunitError, codeunit

NOOP = 1
ECHO = 2
SLEEP = 3
SPIN = 4
RAISE = 5
CUSTOM_ERROR = 6
EXIT = 7
SIGNAL_SELF = 8
BAD_RESULT = 9
BIG_RESULT = 10
SPAWN_AND_SPIN = 11
ALLOCATE = 12
DB_READ = 13
DB_WRITE = 14
LOG = 15
CONTEXT = 16
NONE_RESULT = 17
ESCAPE = 18
LOG_SPIN = 19
DIE_AFTER_RETURN = 20
IMPORT_SOCKET = 21

# Opened at import, in the broker, before any fork: workers must keep it usable.
_IMPORT_PAIR = socket.socketpair()


@codeunit(NOOP, name="Noop")
def noop(ctx: ChildSession) -> dict[str, str]:
    return {}


@codeunit(ECHO, name="Echo")
def echo(ctx: ChildSession) -> dict[str, str]:
    return dict(ctx.parameters)


@codeunit(SLEEP, name="Sleep")
def sleep(ctx: ChildSession) -> dict[str, str]:
    time.sleep(float(ctx.parameters.get("seconds", "0")))
    return {"slept": ctx.parameters.get("seconds", "0"), "pid": str(os.getpid())}


@codeunit(SPIN, name="Spin")
def spin(ctx: ChildSession) -> dict[str, str]:
    """Burn CPU forever: only a kill ends it."""
    x = 0
    while True:
        x += 1


@codeunit(RAISE, name="Raise")
def raise_value_error(ctx: ChildSession) -> dict[str, str]:
    raise ValueError(ctx.parameters.get("message", "boom"))


@codeunit(CUSTOM_ERROR, name="CustomError")
def custom_error(ctx: ChildSession) -> dict[str, str]:
    raise CodeunitError("Customer is blocked", code="CUST:Blocked")


@codeunit(EXIT, name="Exit")
def hard_exit(ctx: ChildSession) -> dict[str, str]:
    os._exit(int(ctx.parameters.get("code", "7")))


@codeunit(SIGNAL_SELF, name="SignalSelf")
def signal_self(ctx: ChildSession) -> dict[str, str]:
    os.kill(os.getpid(), getattr(signal, ctx.parameters.get("signal", "SIGSEGV")))
    time.sleep(10)
    return {}


@codeunit(BAD_RESULT, name="BadResult")
def bad_result(ctx: ChildSession) -> Any:  # deliberately not dict[str, str]
    return {"count": 42}


@codeunit(BIG_RESULT, name="BigResult")
def big_result(ctx: ChildSession) -> dict[str, str]:
    return {"blob": "x" * int(ctx.parameters.get("bytes", "2000000"))}


@codeunit(SPAWN_AND_SPIN, name="SpawnAndSpin")
def spawn_and_spin(ctx: ChildSession) -> dict[str, str]:
    """Start a grandchild, publish its pid, then spin until killed."""
    child = subprocess.Popen(["sleep", "600"])
    path = ctx.parameters["pidfile"]
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(path + ".tmp", path)
    x = 0
    while True:
        x += 1


@codeunit(ALLOCATE, name="Allocate")
def allocate(ctx: ChildSession) -> dict[str, str]:
    """Hold ``mb`` MiB of touched memory, then sleep."""
    blob = bytearray(int(ctx.parameters.get("mb", "100")) * 2**20)
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    time.sleep(float(ctx.parameters.get("seconds", "30")))
    return {"len": str(len(blob))}


@codeunit(DB_READ, name="DbRead")
def db_read(ctx: ChildSession) -> dict[str, str]:
    (count,) = ctx.db.execute("SELECT count(*) FROM customer WHERE blocked = ?", (1,)).fetchone()
    return {"blocked": str(count)}


@codeunit(DB_WRITE, name="DbWrite")
def db_write(ctx: ChildSession) -> dict[str, str]:
    ctx.db.execute("INSERT INTO customer (name, blocked) VALUES (?, ?)", ("intruder", 0))
    return {}


@codeunit(LOG, name="Log")
def log_something(ctx: ChildSession) -> dict[str, str]:
    ctx.log.warning("codeunit says %s", ctx.parameters.get("text", "hello"))
    return {}


@codeunit(CONTEXT, name="Context")
def context(ctx: ChildSession) -> dict[str, str]:
    return {
        "task_id": str(ctx.task_id),
        "session_id": str(ctx.session_id),
        "record_id": ctx.record_id,
        "codeunit_id": str(ctx.codeunit_id),
        "remaining_ms": str(int(ctx.remaining() * 1000)),
        "pid": str(os.getpid()),
    }


@codeunit(NONE_RESULT, name="NoneResult")
def none_result(ctx: ChildSession) -> None:
    return None


@codeunit(ESCAPE, name="Escape")
def escape(ctx: ChildSession) -> dict[str, str]:
    """Leave a daemon behind: double fork + setsid, outside our process group and tree."""
    path = ctx.parameters["pidfile"]
    subprocess.run(
        [
            "sh",
            "-c",
            f'setsid sh -c \'sleep 600 & echo $! > "{path}.tmp"; mv "{path}.tmp" "{path}"\' &',
        ],
        check=True,
    )
    return {}


@codeunit(LOG_SPIN, name="LogSpin")
def log_spin(ctx: ChildSession) -> dict[str, str]:
    """Log as fast as possible until killed: a kill lands mid-write sooner or later."""
    n = 0
    while True:
        n += 1
        ctx.log.info("spin record %d %s", n, "x" * 200)


@codeunit(DIE_AFTER_RETURN, name="DieAfterReturn")
def die_after_return(ctx: ChildSession) -> dict[str, str]:
    """Return a result, and have the worker die right after it was sent.

    The killer is a process that left the worker's tree (a backgrounded shell command), so
    the worker sees nothing left behind and takes its next task: the death then races it.
    """
    delay = float(ctx.parameters.get("delay", "0.001"))
    subprocess.run(
        ["sh", "-c", f"(sleep {delay}; kill -9 {os.getpid()}) >/dev/null 2>&1 &"], check=True
    )
    return {"pid": str(os.getpid())}


@codeunit(IMPORT_SOCKET, name="ImportSocket")
def import_socket(ctx: ChildSession) -> dict[str, str]:
    _IMPORT_PAIR[0].sendall(b"ping")
    sockets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sockets.append(fd)
        except FileNotFoundError:
            pass  # the directory listing's own fd
    return {"echo": _IMPORT_PAIR[1].recv(4).decode(), "sockets": str(len(sockets))}


# --- hostile codeunits: what one task must not be able to do to another --------------------

FORGE = 22
LEAVE_BEHIND = 23
FORK_AND_READ = 24
HALF_READ = 25
CONNECT_BACK = 26
BEHAVE = 27
DB_TWICE = 28
DB_SLOW = 29
ADVISORY = 30
WAIT_FILE = 31
RESET_DUMP_SIGNAL = 32
FORK_DAEMON = 33
SHARED = 34
SHARED_PER_CONTEXT = 35
PROGRESS = 36
SHARED_PROGRESS = 37
CACHED = 38
CACHED_BRIEFLY = 39


def _worker_spec() -> Any:
    """What a codeunit that digs through memory finds: its worker's fds."""
    import gc

    return next(o for o in gc.get_objects() if type(o).__name__ == "WorkerSpec")


@codeunit(FORGE, name="Forge")
def forge(ctx: ChildSession) -> dict[str, str]:
    """Write a forged message to the result pipe the worker inherited."""
    import msgpack

    spec = _worker_spec()
    kind = ctx.parameters.get("kind", "done-without-results")
    job = max(int(o["job"]) for o in _runs())  # this task's job
    forged: object
    if kind == "done-without-results":
        forged = {"op": "done", "gen": spec.gen, "job": job}
    elif kind == "not-a-map":
        forged = [1, 2, 3]
    elif kind == "garbage":
        os.write(spec.res_w, b"\xc1\xc1\xc1")
        time.sleep(5)
        return {}
    elif kind == "other-job":
        forged = {"op": "done", "gen": spec.gen, "job": job + 1000, "results": {}}
    elif kind == "next-job":
        # Its own end, then words for the job the broker would hand this worker next (once
        # the file ``go`` exists: another session's task waits by then).
        while not os.path.exists(ctx.parameters["go"]):
            time.sleep(0.005)
        own = {"op": "done", "gen": spec.gen, "job": job, "results": {"forged": "own"}}
        theirs = {"op": "done", "gen": spec.gen, "job": job + 1, "results": {"forged": "yes"}}
        os.write(spec.res_w, b"".join(msgpack.packb(m) for m in (own, theirs)))
        time.sleep(5)
        return {}
    elif kind == "next-job-later":
        # Its own end; then, once the broker has handed this worker its next job (another
        # session's: the job pipe turns readable), an answer for it, without reading it.
        import select

        own = {"op": "done", "gen": spec.gen, "job": job, "results": {"forged": "own"}}
        os.write(spec.res_w, msgpack.packb(own))
        select.select([spec.job_r], [], [], 20)
        forged = {"op": "done", "gen": spec.gen, "job": job + 1, "results": {"forged": "yes"}}
    elif kind == "huge-results":
        forged = {"op": "done", "gen": spec.gen, "job": job, "results": {"x": "y" * (4 << 20)}}
    else:
        raise ValueError(kind)
    os.write(spec.res_w, msgpack.packb(forged))
    time.sleep(5)  # the broker must not wait for us to fail this task
    return {}


def _runs() -> list[dict[str, Any]]:
    import gc

    return [o for o in gc.get_objects() if type(o) is dict and o.get("op") == "run" and "job" in o]


@codeunit(LEAVE_BEHIND, name="LeaveBehind")
def leave_behind(ctx: ChildSession) -> dict[str, str]:
    """Change the worker process the way a careless codeunit might, then return."""
    import resource

    what = ctx.parameters.get("what", "")
    if what == "thread":
        threading.Thread(target=time.sleep, args=(30,), daemon=True, name="leftover").start()
    elif what == "alarm":
        signal.alarm(100)
    elif what == "handler":
        signal.signal(signal.SIGUSR2, lambda *args: None)
    elif what == "rlimit":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    elif what == "cwd":
        os.chdir("/")
    elif what == "environ":
        os.environ["LEFT_BEHIND"] = "1"
    elif what == "child":
        subprocess.Popen(["sleep", "30"])
    elif what:
        raise ValueError(what)
    return {"pid": str(os.getpid())}


@codeunit(FORK_AND_READ, name="ForkAndRead")
def fork_and_read(ctx: ChildSession) -> dict[str, str]:
    """Fork a copy of the worker and let it try to read jobs and answer them."""
    spec = _worker_spec()
    report = ctx.parameters["report"]
    pid = os.fork()
    if pid == 0:
        outcome = []
        for name, fd in (("job", spec.job_r), ("result", spec.res_w)):
            try:
                os.fstat(fd)
                outcome.append(f"{name}:open")
            except OSError:
                outcome.append(f"{name}:closed")
        with open(report, "w") as f:
            f.write(" ".join(outcome))
        os._exit(0)
    os.waitpid(pid, 0)
    return {"pid": str(os.getpid())}


@codeunit(HALF_READ, name="HalfRead")
def half_read(ctx: ChildSession) -> dict[str, str]:
    """Read one row of many and keep the cursor: its read must still end with the task."""
    rows = ctx.db.execute("SELECT id FROM customer")
    global _KEPT
    _KEPT = rows
    return {"first": str(rows.fetchone()[0])}


_KEPT: Any = None


@codeunit(CONNECT_BACK, name="ConnectBack")
def connect_back(ctx: ChildSession) -> dict[str, str]:
    """A child session trying to start background tasks of its own."""
    from pbt_server import in_child_session
    from pbt_server.client import connect

    try:
        connect(ctx.parameters["socket"], timeout=2)
    except Exception as err:
        return {
            "inside": str(in_child_session()),
            "code": getattr(err, "code", ""),
            "text": str(err),
        }
    return {"inside": str(in_child_session()), "code": "", "text": "connected"}


@codeunit(BEHAVE, name="Behave")
def behave(ctx: ChildSession) -> dict[str, str]:
    return {"pid": str(os.getpid()), "context": repr(dict(ctx.context))}


@codeunit(DB_TWICE, name="DbTwice")
def db_twice(ctx: ChildSession) -> dict[str, str]:
    """Count twice, waiting for a file between: one snapshot per task sees the same count."""
    (first,) = ctx.db.execute("SELECT count(*) FROM customer").fetchone()
    started = ctx.parameters["started"]
    with open(started, "w") as f:
        f.write("1")
    go = ctx.parameters["go"]
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    (second,) = ctx.db.execute("SELECT count(*) FROM customer").fetchone()
    return {"first": str(first), "second": str(second)}


@codeunit(DB_SLOW, name="DbSlow")
def db_slow(ctx: ChildSession) -> dict[str, str]:
    """A statement that runs for seconds (StatementTimeout stops it)."""
    if ctx.db.backend == "postgresql":
        ctx.db.execute("SELECT pg_sleep(10)").fetchone()
    else:
        ctx.db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
        ).fetchone()
    return {}


@codeunit(ADVISORY, name="Advisory")
def advisory(ctx: ChildSession) -> dict[str, str]:
    """Take two advisory locks in the given order, with a pause between (a deadlock pair)."""
    first, second = int(ctx.parameters["first"]), int(ctx.parameters["second"])
    ctx.db.execute("SELECT pg_advisory_xact_lock(%s)", (first,)).fetchone()
    time.sleep(float(ctx.parameters.get("pause", "0.5")))
    ctx.db.execute("SELECT pg_advisory_xact_lock(%s)", (second,)).fetchone()
    return {}


@codeunit(WAIT_FILE, name="WaitFile")
def wait_file(ctx: ChildSession) -> dict[str, str]:
    """Write ``started``, then wait (up to 20 s) until the file ``go`` exists."""
    with open(ctx.parameters["started"], "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 20
    while not os.path.exists(ctx.parameters["go"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return {"pid": str(os.getpid())}


@codeunit(RESET_DUMP_SIGNAL, name="ResetDumpSignal")
def reset_dump_signal(ctx: ChildSession) -> dict[str, str]:
    """Put the stack-dump signal back to its default action (which ends the process), then
    spin until the timeout if asked to."""
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    if ctx.parameters.get("spin"):
        while True:
            pass
    return {"pid": str(os.getpid())}


@codeunit(FORK_DAEMON, name="ForkDaemon")
def fork_daemon(ctx: ChildSession) -> dict[str, str]:
    """os.fork a child that leaves the session and sleeps; write both pids to ``pidfile``,
    then wait to be killed."""
    child = os.fork()
    if child == 0:
        os.setsid()
        time.sleep(60)
        os._exit(0)
    path = ctx.parameters["pidfile"]
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child}")
    os.rename(path + ".tmp", path)
    time.sleep(60)
    return {}


def _shared_run(ctx: ChildSession) -> dict[str, str]:
    """Count the run in ``runs`` (a line per execution), wait for ``go`` (if given), then
    answer, or fail with ``fail``."""
    with open(ctx.parameters["runs"], "a") as f:
        f.write(f"{os.getpid()}\n")
    go = ctx.parameters.get("go")
    deadline = time.monotonic() + 20
    while go and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    if "fail" in ctx.parameters:
        raise CodeunitError(ctx.parameters["fail"], code="CUST:Shared")
    return {"pid": str(os.getpid()), "user": ctx.context.get("user", "")}


@codeunit(SHARED, name="Shared", shared=True)
def shared(ctx: ChildSession) -> dict[str, str]:
    return _shared_run(ctx)


@codeunit(SHARED_PER_CONTEXT, name="SharedPerContext", shared=True, per_context=True)
def shared_per_context(ctx: ChildSession) -> dict[str, str]:
    return _shared_run(ctx)


def _progress(ctx: ChildSession) -> dict[str, str]:
    """Report ``steps`` steps, ``pause`` seconds apart (waiting for ``go`` first, if given)."""
    go = ctx.parameters.get("go")
    deadline = time.monotonic() + 20
    while go and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    steps = int(ctx.parameters.get("steps", "10"))
    for step in range(1, steps + 1):
        ctx.set_progress({"done": str(step), "of": str(steps)})
        time.sleep(float(ctx.parameters.get("pause", "0.02")))
    if "bad" in ctx.parameters:
        ctx.set_progress({"x": "y" * 5000})  # over 4 KB: ValueError
    return {"steps": str(steps)}


@codeunit(PROGRESS, name="Progress")
def progress(ctx: ChildSession) -> dict[str, str]:
    return _progress(ctx)


@codeunit(SHARED_PROGRESS, name="SharedProgress", shared=True)
def shared_progress(ctx: ChildSession) -> dict[str, str]:
    return _progress(ctx)


def _count_blocked(ctx: ChildSession) -> dict[str, str]:
    """Count a run in ``runs``, then the blocked customers (or fail with ``fail``)."""
    with open(ctx.parameters["runs"], "a") as f:
        f.write(f"{os.getpid()}\n")
    if "fail" in ctx.parameters:
        raise CodeunitError(ctx.parameters["fail"], code="CUST:Cached")
    (count,) = ctx.db.execute("SELECT count(*) FROM customer WHERE blocked = 1").fetchone()
    return {"blocked": str(count)}


@codeunit(CACHED, name="Cached", shared=True, cache=True)
def cached(ctx: ChildSession) -> dict[str, str]:
    return _count_blocked(ctx)


@codeunit(CACHED_BRIEFLY, name="CachedBriefly", shared=True, cache=True, max_age=0.3)
def cached_briefly(ctx: ChildSession) -> dict[str, str]:
    return _count_blocked(ctx)
