"""The codeunits the cluster's brokers run (``[Codeunits] Modules = tests.cluster.codeunits``).

They read the hot standby through ``ctx.db`` as the SELECT-only role. Times they report are
``time.monotonic()``, which every process on the machine shares, so the harness can set them
against its own clock.
"""

from __future__ import annotations

import os
import time

from workers import ChildSession, codeunit

NOOP = 15001
WHOAMI = 15002
BLOCKED_CUSTOMERS = 15003
WATCH_SEQUENCE = 15004
TRY_WRITE = 15005

_POLL_PAUSE_S = 0.0002  # between polls of the standby: a fresh snapshot each time


@codeunit(NOOP, name="Noop")
def noop(ctx: ChildSession) -> dict[str, str]:
    return {}


@codeunit(WHOAMI, name="Whoami")
def whoami(ctx: ChildSession) -> dict[str, str]:
    """Which broker runs this session: a worker is a child of its broker."""
    return {"broker_pid": str(os.getppid()), "worker_pid": str(os.getpid())}


@codeunit(BLOCKED_CUSTOMERS, name="BlockedCustomers")
def blocked_customers(ctx: ChildSession) -> dict[str, str]:
    """The role center's cue: count blocked customers, after ``Delay`` ms of pretend work."""
    delay_ms = int(ctx.parameters.get("Delay", "0"))
    if delay_ms:
        time.sleep(delay_ms / 1000)
    started = time.monotonic()
    (blocked,) = ctx.db.execute("SELECT count(*) FROM customer WHERE blocked <> ''").fetchone()
    return {
        "BlockedCustomers": str(blocked),
        "QuerySeconds": f"{time.monotonic() - started:.6f}",
    }


@codeunit(WATCH_SEQUENCE, name="WatchSequence")
def watch_sequence(ctx: ChildSession) -> dict[str, str]:
    """Watch ``lag_probe`` on the standby until row ``Last`` is there (or ``Seconds`` pass).

    Returns ``Seen``: ``seq=monotonic time it was first visible`` for every row that appeared
    while watching, separated by spaces.
    """
    last = int(ctx.parameters["Last"])
    deadline = time.monotonic() + float(ctx.parameters.get("Seconds", "10"))
    highest = int(ctx.parameters.get("After", "0"))
    seen: list[str] = []
    polls = 0
    first_poll = time.monotonic()
    while highest < last and time.monotonic() < deadline:
        (top,) = ctx.db.execute("SELECT coalesce(max(seq), 0) FROM lag_probe").fetchone()
        ctx.db.rollback()  # a task reads one snapshot; a new transaction takes a fresh one
        now = time.monotonic()
        polls += 1
        if top > highest:
            seen += (f"{seq}={now:.6f}" for seq in range(highest + 1, top + 1))
            highest = top
        time.sleep(_POLL_PAUSE_S)
    return {
        "Seen": " ".join(seen),
        "Polls": str(polls),
        "Highest": str(highest),
        "FirstPoll": f"{first_poll:.6f}",
    }


@codeunit(TRY_WRITE, name="TryWrite")
def try_write(ctx: ChildSession) -> dict[str, str]:
    """A child session that breaks its contract: the standby must refuse the write."""
    ctx.db.execute("INSERT INTO lag_probe (seq) VALUES (%s)", (-1,))
    return {"Wrote": "yes"}
