"""Codeunits the tests run: well-behaved and misbehaving, at module level (pebble's habit)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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
