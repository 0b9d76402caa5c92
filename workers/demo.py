"""The demo codeunits: the two examples the product started from (a Role Center cue and the
Customer Card's ``Wait``), plus the other cues and the customer list of the web demo's Role
Center and Customer Card.

- ``BackgroundTask`` (the blog's Role Center cue): counts blocked customers in the background.
- ``50100 Wait`` (the docs' Customer Card example): waits ``Wait`` ms and returns
  Before/Duration/After.
- ``CustomerCount``, ``BlockedByReason``: two more Role Center cues.
- ``CustomerList``: the first ``Count`` customers, for the Customer Card's list.

All read through ``ctx.db``, which is read-only at the database level, and bind parameters.
``Delay`` (ms) stands in for the blog's Sleep: a cue that takes a moment to compute.
"""

from __future__ import annotations

import time
from datetime import datetime

from pbt_server import ChildSession, codeunit
from pbt_server.demo_ids import (
    BLOCKED_BY_REASON,
    BLOCKED_CUSTOMERS,
    CUSTOMER_COUNT,
    CUSTOMER_LIST,
    DEMO_CODEUNITS,
    WAIT,
)

__all__ = ["DEMO_CODEUNITS"]


def _delay(ctx: ChildSession) -> None:
    delay_ms = int(ctx.parameters.get("Delay", "0"))
    if delay_ms:
        time.sleep(delay_ms / 1000)


@codeunit(BLOCKED_CUSTOMERS, name="BackgroundTask")
def count_blocked_customers(ctx: ChildSession) -> dict[str, str]:
    """Count blocked customers."""
    _delay(ctx)
    (blocked,) = ctx.db.execute(
        "SELECT count(*) FROM customer WHERE blocked <> ?", ("",)
    ).fetchone()
    return {"BlockedCustomers": str(blocked)}


@codeunit(WAIT, name="Wait")
def wait(ctx: ChildSession) -> dict[str, str]:
    """Wait ``Wait`` milliseconds; report when it started and ended."""
    wait_ms = int(ctx.parameters.get("Wait", "0"))
    before = datetime.now()
    time.sleep(wait_ms / 1000)
    after = datetime.now()
    return {
        "Before": before.isoformat(sep=" ", timespec="milliseconds"),
        "Duration": f"{(after - before).total_seconds() * 1000:.0f} ms",
        "After": after.isoformat(sep=" ", timespec="milliseconds"),
    }


@codeunit(CUSTOMER_COUNT, name="CustomerCount")
def count_customers(ctx: ChildSession) -> dict[str, str]:
    """Count all customers."""
    _delay(ctx)
    (customers,) = ctx.db.execute("SELECT count(*) FROM customer").fetchone()
    return {"Customers": str(customers)}


@codeunit(BLOCKED_BY_REASON, name="BlockedByReason")
def count_blocked_by_reason(ctx: ChildSession) -> dict[str, str]:
    """Blocked customers per reason: ``Ship``, ``Invoice``, ``All`` (0 when none)."""
    _delay(ctx)
    rows = ctx.db.execute(
        "SELECT blocked, count(*) FROM customer WHERE blocked <> ? GROUP BY blocked", ("",)
    ).fetchall()
    counts = {"Ship": "0", "Invoice": "0", "All": "0"}
    counts.update({str(reason): str(count) for reason, count in rows})
    return counts


@codeunit(CUSTOMER_LIST, name="CustomerList")
def list_customers(ctx: ChildSession) -> dict[str, str]:
    """The first ``Count`` customers by number: ``{no: name}``, blocked ones marked."""
    count = min(int(ctx.parameters.get("Count", "20")), 1000)
    rows = ctx.db.execute(
        "SELECT no, name, blocked FROM customer ORDER BY no LIMIT ?", (count,)
    ).fetchall()
    return {no: f"{name} (blocked: {blocked})" if blocked else name for no, name, blocked in rows}
