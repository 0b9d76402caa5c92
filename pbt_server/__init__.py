"""pbt-server: page background tasks for Python applications."""

__version__ = "0.1.0"
