"""pbt-server: page background tasks for Python applications.

Codeunit authors need only this package: ``from pbt_server import codeunit, CodeunitError``.
"""

import logging

from pbt_server.codeunits import ChildSession, codeunit, in_child_session
from pbt_server.errors import CodeunitError

__version__ = "0.2.0"
__all__ = ["ChildSession", "CodeunitError", "__version__", "codeunit", "in_child_session"]

# A library logs only where the application asked it to (no last-resort output to stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())
