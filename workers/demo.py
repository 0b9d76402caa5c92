"""The demo codeunits: the two examples the product started from (shared/seeds/).

- ``BackgroundTask`` (the blog's Role Center cue): counts blocked customers in the background.
- ``50100 Wait`` (the docs' Customer Card example): waits ``Wait`` ms and returns
  Before/Duration/After.

Both read through ``ctx.db``, which is read-only at the database level, and bind parameters.
"""

from __future__ import annotations

import time
from datetime import datetime

from pbt_server import ChildSession, codeunit

BLOCKED_CUSTOMERS = 50101
WAIT = 50100


@codeunit(BLOCKED_CUSTOMERS, name="BackgroundTask")
def count_blocked_customers(ctx: ChildSession) -> dict[str, str]:
    """Count blocked customers; ``Delay`` (ms) stands in for the blog's Sleep."""
    delay_ms = int(ctx.parameters.get("Delay", "0"))
    if delay_ms:
        time.sleep(delay_ms / 1000)
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
