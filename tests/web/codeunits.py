"""Codeunits the browser tests run besides the demo's and tests.codeunits."""

from __future__ import annotations

from workers import ChildSession, codeunit

CONTEXT_MAP = 900


@codeunit(CONTEXT_MAP, name="ContextMap")
def context_map(ctx: ChildSession) -> dict[str, str]:
    """The parent session's context (``Access.context`` of the browser that enqueued it)."""
    return dict(ctx.context)  # type: ignore[attr-defined, unused-ignore]
