"""Pages in the browser: the bridge between browser tabs and the broker.

::

    app.mount("/pbt", pbt_server.web.create_app("config/server.ini", authorize=who_is_it))

serves ``/pbt/pbt.js`` (``window.pbt``: ``connect()``, ``openPage``, ``enqueueBackgroundTask``,
``data-pbt-cue``) and ``/pbt/ws``, the WebSocket each tab opens: one tab, one parent session
at the broker, through the asyncio client. ``authorize(request) -> Access | None`` decides per
connection who may connect, which codeunits they may enqueue, and the ``context`` their
child sessions get. ``create_dashboard_app()`` is the broker's live dashboard, to mount behind
the application's own authentication. Needs the ``web`` extra: ``pip install 'pbt-server[web]'``.
"""

from __future__ import annotations

from pbt_server.web.access import (
    Access,
    AccessDenied,
    Authorize,
    CodeunitNotAllowed,
    OriginNotAllowed,
    SessionExpired,
)
from pbt_server.web.app import create_app
from pbt_server.web.bridge import Bridge
from pbt_server.web.dashboard import create_dashboard_app

__all__ = [
    "Access",
    "AccessDenied",
    "Authorize",
    "Bridge",
    "CodeunitNotAllowed",
    "OriginNotAllowed",
    "SessionExpired",
    "create_app",
    "create_dashboard_app",
]
