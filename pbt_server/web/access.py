"""Who may connect from a browser, and what they may run: ``Access``, ``authorize``, ``Origin``."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from pbt_server.errors import EnqueueError, PbtError


@dataclass(frozen=True)
class Access:
    """What one browser connection may do; returned by the app's ``authorize`` hook.

    Attributes:
        codeunits: the codeunit ids this browser may enqueue; anything else fails the
            enqueue with ``CodeunitNotAllowed``. Empty by default: a browser must never be
            able to run a codeunit nobody allowed.
        context: text values (user id, company, language) the child sessions of this
            browser's tasks see as ``ctx.context``.
    """

    codeunits: AbstractSet[int] = frozenset()
    context: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        codeunits = frozenset(self.codeunits)
        if not all(type(c) is int for c in codeunits):
            raise TypeError(f"Access.codeunits must hold ints, not {sorted(map(repr, codeunits))}")
        context = dict(self.context)
        if not all(type(k) is str and type(v) is str for k, v in context.items()):
            raise TypeError("Access.context must map str to str")
        object.__setattr__(self, "codeunits", codeunits)
        object.__setattr__(self, "context", context)


Authorize = Callable[[HTTPConnection], "Access | Awaitable[Access | None] | None"]
"""``authorize(request) -> Access | None``, plain or ``async``: called once per WebSocket
connection (a reconnect too) with its HTTP request (cookies, headers); ``None`` refuses."""


async def call_authorize(authorize: Authorize, request: HTTPConnection) -> Access | None:
    answer = authorize(request)
    if inspect.isawaitable(answer):
        answer = await answer
    if answer is not None and not isinstance(answer, Access):
        raise TypeError(f"authorize() must return an Access or None, not {type(answer).__name__}")
    return answer


def default_authorize(codeunits: Iterable[int]) -> Authorize:
    """Without a hook: every browser on an allowed origin gets ``[Web] AllowedCodeunits``."""
    access = Access(frozenset(codeunits))
    return lambda request: access


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Is a page from ``origin`` allowed to open the WebSocket sent to ``host``?

    With no configured list, only pages whose origin names the host the request went to
    (the ``Host`` header) may: a page of another site cannot use the visitor's cookies
    to run codeunits. A missing ``Origin`` (not a browser) is refused too.
    """
    if not origin:
        return False
    origin = origin.lower().rstrip("/")
    listed = tuple(allowed)
    if listed:
        return origin in listed
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default_port = {"http": 80, "https": 443}[parts.scheme]
    return _host_port(parts.netloc, default_port) == _host_port(host.lower(), default_port)


def _host_port(netloc: str, default_port: int) -> tuple[str, int] | None:
    parts = urlsplit(f"//{netloc}")
    try:
        return (parts.hostname or "", parts.port or default_port)
    except ValueError:  # a port that is not a number
        return None


class CodeunitNotAllowed(EnqueueError):
    """The browser's ``Access`` does not list that codeunit."""

    code = "CodeunitNotAllowed"


class AccessDenied(PbtError):
    """``authorize`` refused the connection, or a resume came from another user."""

    code = "AccessDenied"


class OriginNotAllowed(PbtError):
    """The page's ``Origin`` is neither the host nor in ``[Web] AllowedOrigins``."""

    code = "OriginNotAllowed"


class SessionExpired(PbtError):
    """A resume named a session that ended (grace window passed, or closed)."""

    code = "SessionExpired"
