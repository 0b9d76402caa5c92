"""The wire formats: client <-> broker frames, and broker <-> worker pipe messages.

Client <-> broker (Unix socket, or TCP with a token)
-----------------------------------------------------
Each frame is a 4-byte big-endian length ``N`` (1 <= N <= MaxFrameBytes) followed by ``N``
bytes holding one msgpack map with ``str`` keys. The length is checked before the body is
read; the body is unpacked with limits (no bin, no ext, small arrays) and validated before
use. Anything else is a :class:`ProtocolError`: the broker answers with an ``error`` frame
(``rid`` nil, code ``ProtocolError``) and closes that one connection.

Requests carry ``op`` and ``rid`` (an int the client picks; echoed in the answer). The first
request on a connection must be ``hello``. Answers are ``{"op": "reply", "rid", ...fields}``
or ``{"op": "error", "rid", "code", "text"}``.

=========== ========================================================== =====================
op          request fields                                             reply fields
=========== ========================================================== =====================
hello       protocol:int, token:str ("" on the Unix socket)            session:int
open_page   name:str, record:str                                       page:int
set_record  page:int, record:str                                       cancelled:[int]
close_page  page:int                                                   cancelled:[int]
enqueue     page:int, codeunit:int, parameters:{str:str},              task:int, timeout:int
            timeout:int|nil (ms), level:"Ignore"|"Warning"|"Error"
cancel      task:int                                                   cancelled:bool
ping        -                                                          -
status      -                                                          sessions:[map],
                                                                       workers:[map]
=========== ========================================================== =====================

Events (broker -> client, no ``rid``), exactly one per accepted task:

- ``completed``  task:int, page:int, results:{str:str}
- ``failed``     task:int, page:int, code:str, text:str, stack:str
- ``cancelled``  task:int, page:int, code:str (the reason), text:str

plus ``shutdown`` (code ``ServerShuttingDown``, text) just before the broker closes. The
``cancelled`` events a request causes are sent before that request's reply.

Broker <-> worker (one pipe pair per worker)
--------------------------------------------
A stream of msgpack maps, no length prefix: both ends are ours, so a streaming ``Unpacker``
is enough (and 2x faster than framing in Python, see package-notes §4.3).

- broker -> worker: ``run`` {job:int, codeunit:int, parameters, task:int, session:int,
  record:str, timeout:int (ms)}
- worker -> broker: ``ready`` {gen, pid} once after boot; then per job ``started`` {gen,
  job} (the timeout clock starts here), and ``done`` {gen, job, results} or ``failed`` {gen,
  job, code, text, stack}.

``job`` is unique across the broker's life and ``gen`` names the worker incarnation, so a
message from a worker that was killed can never be taken for another task's.
"""

from __future__ import annotations

import dataclasses
import reprlib
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar, Final

import msgpack

from pbt_server.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 1 << 20
MAX_TEXT: Final = 4096  # page names and record ids
MAX_PARAMETERS: Final = 4096  # entries in a parameters or results map
_HEADER: Final = struct.Struct(">I")
_INT64_MAX: Final = (1 << 63) - 1

Message = dict[str, object]


def encode_frame(message: Mapping[str, object]) -> bytes:
    """Pack ``message`` as one length-prefixed frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Split a byte stream into frames and unpack each into a ``dict``.

    ``feed`` returns every complete frame; a partial one waits for more bytes. A frame
    longer than ``max_frame`` is refused from its header alone, before its body arrives.
    ``trusted`` relaxes the array limit, for a client reading the broker's answers.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, trusted: bool = False) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._limits: dict[str, int] = {
            "max_bin_len": 0,
            "max_ext_len": 0,
            "max_array_len": max_frame if trusted else 64,
            "max_map_len": max_frame if trusted else MAX_PARAMETERS + 16,
        }

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add ``data``; iterate over every frame it completes.

        Frames before a malformed one are yielded first, then :class:`ProtocolError` is
        raised, so a good request in the same read as garbage is still answered. Iterate to
        the end (or stop using the decoder): the buffer is trimmed when iteration finishes.
        """
        self._buffer += data
        return self._frames()

    def _frames(self) -> Iterator[Message]:
        buffer = self._buffer
        offset = 0
        try:
            while len(buffer) - offset >= _HEADER.size:
                (length,) = _HEADER.unpack_from(buffer, offset)
                if length == 0 or length > self.max_frame:
                    raise ProtocolError(
                        f"frame of {length} bytes refused (limit {self.max_frame} bytes)"
                    )
                end = offset + _HEADER.size + length
                if len(buffer) < end:
                    break
                # Both views are released here, also when unpacking raises (the traceback
                # keeps the slice referenced): a live view would stop the buffer resizing.
                with memoryview(buffer) as view, view[offset + _HEADER.size : end] as body:
                    message = self._unpack(body)
                offset = end
                yield message
        finally:
            if offset:
                del buffer[:offset]  # one shrink per read, never a copy per frame

    def _unpack(self, body: memoryview) -> Message:
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, **self._limits)
        except Exception as err:  # msgpack raises ValueError, TypeError, StackError, ...
            raise ProtocolError(f"frame is not valid msgpack: {err}") from err
        if not isinstance(message, dict):
            raise ProtocolError(f"frame must hold a map, not {type(message).__name__}")
        op = message.get("op")
        if not isinstance(op, str):
            raise ProtocolError("frame has no 'op' string")
        return message


# --- client requests, validated --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    op: ClassVar[str]
    rid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Request):
    op: ClassVar[str] = "hello"
    protocol: int
    token: str


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
    # Checked by the broker, not here: bad parameters fail the enqueue (InvalidParameters),
    # they do not break the connection.
    parameters: object
    timeout: int | None
    level: str


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel(Request):
    op: ClassVar[str] = "cancel"
    task: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ping(Request):
    op: ClassVar[str] = "ping"


@dataclasses.dataclass(frozen=True, slots=True)
class Status(Request):
    op: ClassVar[str] = "status"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


def _brief(value: object) -> str:
    """A short, bounded repr of untrusted input (a plain repr of a value nested 1000 deep
    raises RecursionError; of a large one, builds the whole text first)."""
    return _REPR.repr(value)


def _check_id(name: str, value: object) -> object:
    if type(value) is not int or not 0 <= value <= _INT64_MAX:
        raise ProtocolError(f"field {name!r} must be a non-negative int64, got {_brief(value)}")
    return value


def _check_text(name: str, value: object) -> object:
    if type(value) is not str:
        raise ProtocolError(f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ProtocolError(f"field {name!r} is longer than {MAX_TEXT} characters")
    return value


def _check_timeout(name: str, value: object) -> object:
    if value is None:
        return None
    if type(value) is not int or abs(value) > _INT64_MAX:
        raise ProtocolError(f"field {name!r} must be an int64 or nil, got {_brief(value)}")
    return value


def _check_any(name: str, value: object) -> object:
    return value


# Checks by annotation; dataclass fields are strings under `from __future__ import annotations`.
_CHECKS: Final[dict[str, Callable[[str, object], object]]] = {
    "int": _check_id,
    "str": _check_text,
    "int | None": _check_timeout,
    "object": _check_any,
}
_REQUESTS: Final[dict[str, type[Request]]] = {
    cls.op: cls for cls in (Hello, OpenPage, SetRecord, ClosePage, Enqueue, Cancel, Ping, Status)
}
_FIELDS: Final = {
    op: [(f.name, _CHECKS[str(f.type)]) for f in dataclasses.fields(cls)]
    for op, cls in _REQUESTS.items()
}


def parse_request(message: Message) -> Request:
    """Validate a decoded frame as a request; raise :class:`ProtocolError` naming the fault."""
    op = message["op"]
    cls = _REQUESTS.get(op)  # type: ignore[call-overload]
    if cls is None:
        raise ProtocolError(f"unknown op {op!r:.80}")
    fields = _FIELDS[cls.op]
    unknown = message.keys() - {name for name, _ in fields} - {"op"}
    if unknown:
        raise ProtocolError(f"{cls.op}: unknown field(s) {sorted(unknown)!r:.200}")
    values: dict[str, object] = {}
    for name, check in fields:
        if name not in message:
            if name == "token":
                values[name] = ""
                continue
            raise ProtocolError(f"{cls.op}: missing field {name!r}")
        values[name] = check(name, message[name])
    return cls(**values)


# --- broker <-> worker pipe messages ----------------------------------------------------

PIPE_BUFFER: Final = 64 << 20  # results larger than MaxFrameBytes are refused by the worker


def pipe_unpacker() -> msgpack.Unpacker:
    """A streaming unpacker for one pipe (both ends trusted)."""
    return msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=PIPE_BUFFER)


def pack(message: Mapping[str, object]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)
