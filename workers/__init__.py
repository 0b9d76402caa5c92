"""Codeunits: the functions page background tasks run, in read-only worker processes.

Write one like this (see ``workers/demo.py``)::

    from workers import codeunit

    @codeunit(50100, name="Wait")
    def wait(ctx):
        ms = int(ctx.parameters.get("Wait", "0"))
        ...
        return {"Before": ..., "Duration": ..., "After": ...}
"""

from pbt_server.errors import CodeunitError
from workers.context import ChildSession
from workers.registry import Codeunit, codeunit

__all__ = ["ChildSession", "Codeunit", "CodeunitError", "codeunit"]
