"""One error hierarchy for broker, client and workers, and the one list of wire codes.

Every error that crosses a process boundary carries a wire ``code``. There are two kinds:

- **Request errors**: a request failed synchronously (an enqueue refused, a protocol fault).
  Each is a :class:`PbtError` subclass that names its code; subclasses register their code
  when they are defined, so ``error_from_wire(code, text)`` needs no hand-kept table.
- **Task outcomes**: a task ended in error (:class:`BackgroundTaskError`, code from
  :class:`ChildSessionCode`, or a codeunit's own code) or was cancelled
  (:class:`BackgroundTaskCanceled`, code from :class:`CancelReason`).

:func:`known_codes` lists every code the server itself sends; the README's tables and the
protocol fuzzer's expectations are derived from it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class PbtError(Exception):
    """Base of every pbt-server error; ``.code`` is its wire code, ``.text`` its message.

    ``str(err)`` is the text alone (the code is ``err.code``), so ``f"{err.code}: {err}"``
    says each once.
    """

    code: str = "PbtError"
    sent: ClassVar[bool] = True  # the broker may answer a request with it (not inherited)
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
        return self.text or self.code


def error_from_wire(code: str, text: str) -> PbtError:
    """Rebuild the request error a peer reported as ``(code, text)``."""
    cls = PbtError._registry.get(code, PbtError)
    if issubclass(cls, BackgroundTaskError | BackgroundTaskCanceled | CodeunitError):
        cls = PbtError  # outcome codes arrive as events, never as request errors
    return cls(text, code=code)


def request_error_codes() -> dict[str, type[PbtError]]:
    """Every code the broker may answer a request with, with its class (the web bridge's
    own codes for browsers are declared with it, in ``pbt_server.web``)."""
    return {
        code: cls
        for code, cls in PbtError._registry.items()
        if cls.__module__ == __name__
        and vars(cls).get("sent", True)
        and not issubclass(cls, BackgroundTaskError | BackgroundTaskCanceled | CodeunitError)
    }


def known_codes() -> frozenset[str]:
    """Every code the server may send: request errors, task error codes, cancel reasons."""
    return frozenset(request_error_codes()) | frozenset(ChildSessionCode) | frozenset(CancelReason)


class ConfigError(PbtError):
    """``server.ini`` (or a ``PBT_*`` override) has a bad section, key or value."""

    code = "ConfigError"
    sent = False


class ProtocolError(PbtError):
    """A frame was malformed, too large, of the wrong type, or sent out of order."""

    code = "ProtocolError"


class InternalError(PbtError):
    """A bug in the server; the connection that met it is closed, the server goes on."""

    code = "InternalError"


class AuthenticationFailed(PbtError):
    """The connection did not present the server's ``AuthToken``."""

    code = "AuthenticationFailed"


class ServerBusy(PbtError):
    """The server has no room for another connection (``MaxConnections``, or the small
    budget of connections that have not said hello yet)."""

    code = "ServerBusy"


class TooManyPages(PbtError):
    """The session already has ``MAX_PAGES`` pages open."""

    code = "TooManyPages"


class PageNotFound(PbtError):
    """The request named a page this session never opened."""

    code = "PageNotFound"


class NotAllowed(PbtError):
    """The connection may not make this request (an operator connection enqueuing, say)."""

    code = "NotAllowed"


class BootFailed(PbtError):
    """The worker pool cannot start or keep workers running; the broker stops."""

    code = "BootFailed"
    sent = False


# --- enqueue failures: raised synchronously by enqueue_background_task ------------------


class ReloadFailed(PbtError):
    """A reload found new code or configuration that cannot run (a module that does not
    import, a config error, a database the new workers cannot open); the running code and
    configuration stay."""

    code = "ReloadFailed"


class EnqueueError(PbtError):
    """Base of the errors that make ``enqueue_background_task`` fail at once."""

    code = "EnqueueError"
    sent = False


class QueueFull(EnqueueError):
    """The session already has ``ChildSessionsMaxQueueLength`` tasks waiting."""

    code = "ChildSessionQueueFull"


class UnknownCodeunit(EnqueueError):
    """No codeunit is registered under that id (or this session may not run it)."""

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


class MemoryBudgetExceeded(EnqueueError):
    """The broker's budget for buffered input and queued parameters (``MaxBufferedMB``) is
    spent; the task is refused rather than the broker growing without bound."""

    code = "ServerMemoryBudget"


# --- task outcomes -----------------------------------------------------------------------


class ChildSessionCode(StrEnum):
    """Error codes the server gives a task that ended in the child session."""

    TASK_TIMEOUT = "ChildSessionTaskTimeout"
    CRASHED = "ChildSessionCrashed"
    MEMORY_LIMIT = "ChildSessionMemoryLimit"
    INVALID_RESULT = "ChildSessionInvalidResult"
    DB_WRITE_DENIED = "DB:WriteDenied"
    DB_DEADLOCK = "DB:Deadlock"
    DB_SERIALIZATION_FAILURE = "DB:SerializationFailure"
    DB_TIMEOUT = "DB:Timeout"
    DB_CONNECTION_LOST = "DB:ConnectionLost"

    @property
    def meaning(self) -> str:
        """When the code is sent (for the README's table)."""
        return _MEANINGS[self]


_MEANINGS = {
    ChildSessionCode.TASK_TIMEOUT: "ran past its timeout; the worker's process tree was killed",
    ChildSessionCode.CRASHED: (
        "the worker died (signal, `os._exit`) or broke the pipe protocol; the text says how"
    ),
    ChildSessionCode.MEMORY_LIMIT: "the worker's RSS went over `MaxMemoryMB`; killed",
    ChildSessionCode.INVALID_RESULT: (
        "the result is not `dict[str, str]`, cannot be packed, or is larger than"
        " `MaxFrameBytes` allows"
    ),
    ChildSessionCode.DB_WRITE_DENIED: (
        "the codeunit tried to write; the text is the database's message, or `ctx.db is"
        " read-only: …` for what `ctx.db` refuses before the database sees it"
    ),
    ChildSessionCode.DB_DEADLOCK: "the database chose this task's transaction as a deadlock victim",
    ChildSessionCode.DB_SERIALIZATION_FAILURE: (
        "the database could not keep the task's snapshot consistent (`Isolation = Serializable`)"
        " or a hot standby cancelled it for a conflict with recovery; run it again"
    ),
    ChildSessionCode.DB_TIMEOUT: (
        "a statement ran past `StatementTimeout`, or waited too long for a lock"
    ),
    ChildSessionCode.DB_CONNECTION_LOST: (
        "the connection to the database broke (server restart, failover, network); the next"
        " task reconnects"
    ),
}

TASK_TIMEOUT_TEXT = "Child Session task was terminated because of a timeout."


class CancelReason(StrEnum):
    """Why a task was cancelled (``BackgroundTaskCanceled.code``)."""

    CANCELED = "Canceled"  # cancel_background_task
    RECORD_CHANGED = "RecordChanged"
    PAGE_CLOSED = "PageClosed"
    SESSION_CLOSED = "SessionClosed"
    SERVER_SHUTTING_DOWN = "ServerShuttingDown"


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


# --- client-side connection state (whose fault it was) ------------------------------------


class ConnectionLost(PbtError):
    """The server went away (stopped, killed, or the network broke)."""

    code = "ConnectionLost"
    sent = False


class ClientClosed(PbtError):
    """You closed this client (or session, or page) and then used it."""

    code = "ClientClosed"
    sent = False


class CodeunitError(PbtError):
    """Raise from a codeunit to fail the task with your own error code.

    ``raise CodeunitError("Customer is blocked", code="CUST:Blocked")`` reaches the page's
    error trigger as code ``CUST:Blocked`` and text ``Customer is blocked``.
    """

    code = "CodeunitError"


def render_markdown() -> str:
    """The README's tables of codes: task error codes, cancel reasons, request errors."""
    rows = ["| code | when |", "|---|---|"]
    rows += [f"| `{code.value}` | {code.meaning} |" for code in ChildSessionCode]
    rows.append(
        "| the exception's class name | the codeunit raised (`CodeunitError(text, code=...)`"
        " sets its own code) |"
    )
    rows += ["", "| cancel reason (`BackgroundTaskCanceled.code`) | when |", "|---|---|"]
    rows += [f"| `{reason.value}` | {_CANCEL_MEANINGS[reason]} |" for reason in CancelReason]
    rows += ["", "| request error code | class | when |", "|---|---|---|"]
    for code, cls in sorted(request_error_codes().items()):
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        rows.append(f"| `{code}` | `{cls.__name__}` | {doc} |")
    return "\n".join(rows) + "\n"


_CANCEL_MEANINGS = {
    CancelReason.CANCELED: "`cancel_background_task` (or the handle's `cancel()`)",
    CancelReason.RECORD_CHANGED: "the page moved to another record (`set_record`)",
    CancelReason.PAGE_CLOSED: "the page was closed",
    CancelReason.SESSION_CLOSED: "the session was closed, or its connection dropped",
    CancelReason.SERVER_SHUTTING_DOWN: "the server is stopping",
}
