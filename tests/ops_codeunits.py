"""Codeunits of the operations tests (metrics, dashboard)."""

from __future__ import annotations

import os

from workers import ChildSession, codeunit

LEAVE_ENVIRONMENT = 13001


@codeunit(LEAVE_ENVIRONMENT, name="LeaveEnvironment")
def leave_environment(ctx: ChildSession) -> dict[str, str]:
    """Change the worker's environment: a leftover, so the worker is retired after it."""
    os.environ["PBT_TEST_LEFTOVER"] = str(ctx.task_id)
    return {}
