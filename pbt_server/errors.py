"""One error hierarchy for broker, client and workers.

Every error that crosses a process boundary carries a wire ``code`` (the codes of SPEC §3).
Subclasses register their code when they are defined, so decoding an error from the wire
needs no hand-kept table: ``error_from_wire(code, text)`` returns an instance of the
registered class, or a plain :class:`PbtError` carrying the unknown code.
"""

from __future__ import annotations

from typing import ClassVar


class PbtError(Exception):
    """Base of every pbt-server error; ``.code`` is its wire code, ``.text`` its message."""

    code: str = "PbtError"
    _registry: ClassVar[dict[str, type[PbtError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names its own code registers it; intermediate bases inherit.
        if "code" in cls.__dict__:
            PbtError._registry[cls.code] = cls

    def __init__(self, text: str = "", *, code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.text}" if self.text else self.code


def error_from_wire(code: str, text: str) -> PbtError:
    """Rebuild the error a peer reported as ``(code, text)``."""
    cls = PbtError._registry.get(code, PbtError)
    if cls in (BackgroundTaskError, BackgroundTaskCanceled):
        cls = PbtError
    return cls(text, code=code)


class ConfigError(PbtError):
    """``server.ini`` (or a ``PBT_*`` override) has a bad section, key or value."""

    code = "ConfigError"


class ProtocolError(PbtError):
    """A frame was malformed, too large, of the wrong type, or sent out of order."""

    code = "ProtocolError"


class AuthenticationFailed(PbtError):
    """The connection did not present the server's ``AuthToken``."""

    code = "AuthenticationFailed"


class ServerBusy(PbtError):
    """The server already has ``MaxConnections`` connections open."""

    code = "ServerBusy"


class TooManyPages(PbtError):
    """The session already has ``MAX_PAGES`` pages open."""

    code = "TooManyPages"


class PageNotFound(PbtError):
    """The request named a page this session never opened."""

    code = "PageNotFound"


# --- enqueue failures: raised synchronously by enqueue_background_task (SPEC §3) ---------


class EnqueueError(PbtError):
    """Base of the errors that make ``enqueue_background_task`` fail at once."""

    code = "EnqueueError"


class QueueFull(EnqueueError):
    """The session already has ``ChildSessionsMaxQueueLength`` tasks waiting."""

    code = "ChildSessionQueueFull"


class UnknownCodeunit(EnqueueError):
    """No codeunit is registered under that id."""

    code = "UnknownCodeunit"


class PageClosed(EnqueueError):
    """The page was closed; it takes no more tasks."""

    code = "PageClosed"


class InvalidParameters(EnqueueError):
    """Parameters are not a ``dict[str, str]``, or a timeout/error level is invalid."""

    code = "InvalidParameters"


class ServerShuttingDown(EnqueueError):
    """The server is stopping and takes no more tasks."""

    code = "ServerShuttingDown"


# --- task outcomes -----------------------------------------------------------------------


class BackgroundTaskError(PbtError):
    """A task ended in error; ``.code`` is its error code, e.g. ``ChildSessionTaskTimeout``."""

    code = "BackgroundTaskError"

    def __init__(
        self, text: str = "", *, code: str | None = None, call_stack: str = "", task_id: int = 0
    ) -> None:
        super().__init__(text, code=code)
        self.call_stack = call_stack
        self.task_id = task_id


class BackgroundTaskCanceled(PbtError):
    """A task was cancelled (by id, record change, page close, disconnect or server stop)."""

    code = "BackgroundTaskCanceled"

    def __init__(self, text: str = "", *, code: str | None = None, task_id: int = 0) -> None:
        super().__init__(text, code=code)
        self.task_id = task_id


# --- client-side connection state (trio's rule: say whose fault it was) -------------------


class ConnectionLost(PbtError):
    """The server went away (stopped, killed, or the network broke)."""

    code = "ConnectionLost"


class ClientClosed(PbtError):
    """You closed this client (or session, or page) and then used it."""

    code = "ClientClosed"


class CodeunitError(PbtError):
    """Raise from a codeunit to fail the task with your own error code.

    ``raise CodeunitError("Customer is blocked", code="CUST:Blocked")`` reaches the page's
    error trigger as code ``CUST:Blocked`` and text ``Customer is blocked``.
    """

    code = "CodeunitError"


# Codes the broker sends for a task that ended in the child session (SPEC §3 table).
TASK_TIMEOUT = "ChildSessionTaskTimeout"
TASK_TIMEOUT_TEXT = "Child Session task was terminated because of a timeout."
TASK_CRASHED = "ChildSessionCrashed"
TASK_MEMORY_LIMIT = "ChildSessionMemoryLimit"
TASK_INVALID_RESULT = "ChildSessionInvalidResult"
DB_WRITE_DENIED = "DB:WriteDenied"
# Reasons a task was cancelled (``BackgroundTaskCanceled.code``).
CANCELED_BY_ID = "Canceled"
CANCELED_RECORD_CHANGED = "RecordChanged"
CANCELED_PAGE_CLOSED = "PageClosed"
CANCELED_SESSION_CLOSED = "SessionClosed"
CANCELED_SHUTDOWN = "ServerShuttingDown"
