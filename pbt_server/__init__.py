"""pbt-server: page background tasks for Python applications."""

import logging

__version__ = "0.1.0"

# A library logs only where the application asked it to (no last-resort output to stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())
