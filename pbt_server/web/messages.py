"""The browser <-> bridge wire format: JSON text messages on one WebSocket per tab.

Every message is one JSON object with an ``op`` string, at most ``[Web] MaxMessageBytes``
long, sent as a text message (a binary message is refused). Anything else is a protocol
error: the bridge answers with a fatal ``error`` (``rid`` null) and closes that tab's socket
(code 4400) and session; no other tab notices.

Browser -> bridge
-----------------
The first message must be ``hello``; then requests, each with a ``rid`` larger than the
last one, answered in order. ``ack`` may ride on any message.

=========== ===================================================== ===========================
op          fields                                                reply fields
=========== ===================================================== ===========================
hello       protocol:1, resume:str|null, seq:int (last seq seen)  (a ``welcome``, no rid)
open_page   rid, name:str, record:str                             page:int
set_record  rid, page:int, record:str                             -
close_page  rid, page:int                                         -
enqueue     rid, page:int, codeunit:int, parameters:{str:str},    task:int, timeout:int
            timeout:int|null (ms), level:"Ignore"|"Warning"|"Error"
cancel      rid, page:int, task:int                               cancelled:bool
ping        rid                                                   -
ack         seq:int (the browser has everything up to seq)        (no answer)
close       -                                                     (no answer; session ends)
=========== ===================================================== ===========================

Bridge -> browser
-----------------
``welcome`` {session, token, resumed:bool, grace (ms), rid (last rid received), max_message}
answers ``hello``. Every later message has a ``seq`` (1, 2, ... per session, kept across
reconnects); on a resume the bridge sends again whatever came after the ``seq`` the hello
names, and the browser sends again its requests after the welcome's ``rid``.

- ``reply``      rid, ...reply fields
- ``error``      rid, code, text: the request failed (the promise rejects with ``.code``)
- ``completed``  page, task, results:{str:str}
- ``failed``     page, task, code, text, stack
- ``progress``   page, task, progress:{str:str}: a running task's latest ``ctx.set_progress``
  value, at most one per ``[AsynchronousProcessing] ProgressInterval``, never after its
  ``completed`` or ``failed``

A fatal ``error`` has ``rid`` null and no ``seq``; the socket closes right after it (codes:
4400 protocol error, 4403 refused, 4408 no hello in time, 4410 session expired, 4502 the
broker went away).

An event for a task is never sent before the reply that gave the browser its TaskId.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from typing import ClassVar, Final

from pbt_server.errors import ProtocolError
from pbt_server.protocol import MAX_PARAMETERS, MAX_TEXT

BRIDGE_PROTOCOL: Final = 1
LEVELS: Final = frozenset({"Ignore", "Warning", "Error"})
_INT64_MAX: Final = (1 << 63) - 1

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


@dataclasses.dataclass(frozen=True, slots=True)
class BrowserMessage:
    op: ClassVar[str]


@dataclasses.dataclass(frozen=True, slots=True)
class Hello(BrowserMessage):
    op: ClassVar[str] = "hello"
    resume: str | None
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ack(BrowserMessage):
    op: ClassVar[str] = "ack"
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Close(BrowserMessage):
    op: ClassVar[str] = "close"


@dataclasses.dataclass(frozen=True, slots=True)
class Request(BrowserMessage):
    rid: int


@dataclasses.dataclass(frozen=True, slots=True)
class OpenPage(Request):
    op: ClassVar[str] = "open_page"
    name: str
    record: str


@dataclasses.dataclass(frozen=True, slots=True)
class SetRecord(Request):
    op: ClassVar[str] = "set_record"
    page: int
    record: str


@dataclasses.dataclass(frozen=True, slots=True)
class ClosePage(Request):
    op: ClassVar[str] = "close_page"
    page: int


@dataclasses.dataclass(frozen=True, slots=True)
class Enqueue(Request):
    op: ClassVar[str] = "enqueue"
    page: int
    codeunit: int
    parameters: dict[str, str]
    timeout: int | None
    level: str


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel(Request):
    op: ClassVar[str] = "cancel"
    page: int
    task: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ping(Request):
    op: ClassVar[str] = "ping"


def parse(data: str | bytes | None, max_bytes: int) -> tuple[BrowserMessage, int | None]:
    """Validate one WebSocket message; return it and the ``ack`` it carries, if any.

    Raises:
        ProtocolError: naming what was wrong (type, size, JSON, op, field).
    """
    if not isinstance(data, str):
        raise ProtocolError("binary WebSocket messages are not accepted; send JSON text")
    size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes refused (limit {max_bytes} bytes)")
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as err:  # also ints of more than 4300 digits
        raise ProtocolError(f"message is not JSON: {err!s:.200}") from err
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, not {_kind(message)}")
    op = message.get("op")
    parser = _PARSERS.get(op) if isinstance(op, str) else None
    if parser is None or not isinstance(op, str):
        raise ProtocolError(f"unknown op {_REPR.repr(op)}")
    fields = _Fields(op, message)
    ack = fields.optional_integer("ack")
    parsed = parser(fields)
    fields.finish()
    return parsed, ack


class _Fields:
    """Hands out a message's fields, each checked; leftovers are unknown fields."""

    def __init__(self, op: str, message: dict[str, object]) -> None:
        self.op = op
        self._left = {key: value for key, value in message.items() if key != "op"}

    def _take(self, name: str) -> object:
        if name not in self._left:
            raise ProtocolError(f"{self.op}: missing field {name!r}")
        return self._left.pop(name)

    def integer(self, name: str) -> int:
        value = self._take(name)
        if type(value) is not int or not 0 <= value <= _INT64_MAX:
            raise ProtocolError(
                f"{self.op}: field {name!r} must be a non-negative integer, got {_brief(value)}"
            )
        return value

    def optional_integer(self, name: str) -> int | None:
        if self._left.get(name) is None:  # absent or null
            self._left.pop(name, None)
            return None
        return self.integer(name)

    def text(self, name: str) -> str:
        value = self._take(name)
        if type(value) is not str:
            raise ProtocolError(f"{self.op}: field {name!r} must be a string, got {_kind(value)}")
        if len(value) > MAX_TEXT:
            raise ProtocolError(f"{self.op}: field {name!r} is longer than {MAX_TEXT} characters")
        _check_unicode(self.op, f"field {name!r}", value)
        return value

    def optional_text(self, name: str) -> str | None:
        if self._left.get(name) is None:
            self._left.pop(name, None)
            return None
        return self.text(name)

    def parameters(self, name: str) -> dict[str, str]:
        value = self._take(name)
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.op}: field {name!r} must be an object, got {_kind(value)}")
        if len(value) > MAX_PARAMETERS:
            raise ProtocolError(f"{self.op}: more than {MAX_PARAMETERS} parameters")
        for key, item in value.items():
            if type(item) is not str:
                raise ProtocolError(
                    f"{self.op}: parameter {_brief(key)} must be a string, got {_kind(item)}"
                )
            _check_unicode(self.op, f"parameter {_brief(key)}", key + item)
        return value

    def timeout(self, name: str) -> int | None:
        value = self._take(name)
        if value is not None and (type(value) is not int or abs(value) > _INT64_MAX):
            raise ProtocolError(
                f"{self.op}: field {name!r} must be milliseconds or null, got {_brief(value)}"
            )
        return value

    def level(self, name: str) -> str:
        value = self._take(name)
        if value not in LEVELS:
            raise ProtocolError(
                f"{self.op}: field {name!r} must be one of {', '.join(sorted(LEVELS))},"
                f" got {_brief(value)}"
            )
        assert isinstance(value, str)
        return value

    def finish(self) -> None:
        if self._left:
            names = sorted(self._left)[:10]
            raise ProtocolError(f"{self.op}: unknown field(s) {_brief(names)}")


def _hello(f: _Fields) -> Hello:
    protocol = f.integer("protocol")
    if protocol != BRIDGE_PROTOCOL:
        raise ProtocolError(f"hello: protocol {protocol} is not supported ({BRIDGE_PROTOCOL} is)")
    return Hello(f.optional_text("resume"), f.optional_integer("seq") or 0)


_PARSERS: Final = {
    "hello": _hello,
    "ack": lambda f: Ack(f.integer("seq")),
    "close": lambda f: Close(),
    "open_page": lambda f: OpenPage(f.integer("rid"), f.text("name"), f.text("record")),
    "set_record": lambda f: SetRecord(f.integer("rid"), f.integer("page"), f.text("record")),
    "close_page": lambda f: ClosePage(f.integer("rid"), f.integer("page")),
    "enqueue": lambda f: Enqueue(
        f.integer("rid"),
        f.integer("page"),
        f.integer("codeunit"),
        f.parameters("parameters"),
        f.timeout("timeout"),
        f.level("level"),
    ),
    "cancel": lambda f: Cancel(f.integer("rid"), f.integer("page"), f.integer("task")),
    "ping": lambda f: Ping(f.integer("rid")),
}


def _check_unicode(op: str, what: str, text: str) -> None:
    # JSON may spell a lone surrogate ("\ud800"); it is no text and cannot be sent on.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ProtocolError(f"{op}: {what} holds a lone surrogate at {err.start}") from None


def encode(message: dict[str, object]) -> str:
    """One bridge -> browser message as JSON text."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _brief(value: object) -> str:
    """A short, bounded repr of untrusted input."""
    return _REPR.repr(value)
