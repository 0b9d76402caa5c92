"""Codeunits: the functions page background tasks run, in read-only worker processes.

Write one like this (see ``workers/demo.py``)::

    from pbt_server import codeunit

    @codeunit(50100, name="Wait")
    def wait(ctx):
        ms = int(ctx.parameters.get("Wait", "0"))
        ...
        return {"Before": ..., "Duration": ..., "After": ...}

``from workers import codeunit`` is the same function; ``from pbt_server import ...`` cannot
be shadowed by an application's own package named ``workers``.
"""

from pbt_server.codeunits import ChildSession, Codeunit, codeunit, in_child_session
from pbt_server.errors import CodeunitError

__all__ = ["ChildSession", "Codeunit", "CodeunitError", "codeunit", "in_child_session"]
