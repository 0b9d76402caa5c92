"""The wire formats: client <-> broker frames, and broker <-> worker pipe messages.

Every message is declared once, below, as a ``TypedDict`` whose fields carry their checks
(``Annotated[..., Field(...)]``). The declarations give the code its types (a message is a
plain ``dict``, so building one costs nothing) and the readers their validation
(:class:`Channel`), and the tables in this docstring are generated from them
(:func:`describe`; a test keeps the two equal).

Client <-> broker (Unix socket, or TCP with a token)
-----------------------------------------------------
Each frame is a 4-byte big-endian length ``N`` (1 <= N <= MaxFrameBytes) followed by ``N``
bytes holding one msgpack map with ``str`` keys. The length is checked before the body is
read; the body is unpacked with limits (no bin, no ext, small arrays) and validated before
use. Anything else is a :class:`ProtocolError`: the broker answers with an ``error`` frame
(``rid`` nil, code ``ProtocolError``) and closes that one connection.

Requests carry ``op`` and ``rid`` (an int the client picks; echoed in the answer). The first
request on a connection must be ``hello``. Answers are ``{"op": "reply", "rid", ...fields}``
or ``{"op": "error", "rid", "code", "text"}``. A field marked ``?`` may be left out.

.. requests (generated)

=========== =============================================================================
request     fields
=========== =============================================================================
hello       protocol: id, token?: text, context?: {text: text}, operator?: bool
open_page   name: text, record: text
set_record  page: id, record: text
close_page  page: id
enqueue     page: id, codeunit: id, parameters: any, timeout: int|nil, level: text
cancel      task: id
ping        -
status      -
reload      -
=========== =============================================================================

.. replies (generated)

=========== =============================================================================
reply to    fields
=========== =============================================================================
hello       session: id, server: text, max_frame: id
open_page   page: id
set_record  cancelled: [id]
close_page  cancelled: [id]
enqueue     task: id, timeout: id
cancel      cancelled: bool
ping        -
status      server: map, totals: map, sessions: [map], workers: [map]
reload      codeunits: [id], restart: [text], seconds: map
=========== =============================================================================

Events (broker -> client, no ``rid``): exactly one of ``completed``, ``failed`` or
``cancelled`` per accepted task, plus ``shutdown`` just before the broker closes. The
``cancelled`` events a request causes are sent before that request's reply.

.. events (generated)

=========== =============================================================================
event       fields
=========== =============================================================================
completed   task: id, page: id, results: {text: text}
failed      task: id, page: id, code: text, text: long text, stack: long text
cancelled   task: id, page: id, code: text, text: long text
progress    task: id, page: id, progress: {text: text}
shutdown    code: text, text: long text
error       rid: id|nil, code: text, text: long text
=========== =============================================================================

Broker <-> worker (one pipe pair per worker)
--------------------------------------------
A stream of msgpack maps, no length prefix: a streaming ``Unpacker`` splits them (twice as
fast as framing in Python). The worker trusts the broker; the broker does **not** trust the
worker (a codeunit can write to the pipe it inherited), so every message from a worker is
validated like a client frame, and one that breaks the protocol fails that worker's task.

.. pipe (generated)

=========== ============== ==============================================================
message     direction      fields
=========== ============== ==============================================================
run         to worker      job: id, codeunit: id, parameters: {text: text}, task: id,
                           session: id, record: text, timeout: id, context: {text: text}
ready       from worker    gen: id, pid: id
boot_failed from worker    gen: id, text: long text
progress    from worker    gen: id, job: id, progress: {text: text}
done        from worker    gen: id, job: id, results: {text: text}, leftovers?: [text]
failed      from worker    gen: id, job: id, code: text, text: long text,
                           stack: long text, leftovers?: [text]
tried       from trial     gen: id, codeunits: [id], files: [text]
boot_failed from trial     gen: id, text: long text
=========== ============== ==============================================================

``job`` is unique across the broker's life and ``gen`` names the worker incarnation, so a
message from a worker that was killed can never be taken for another task's. A worker says
nothing when it starts a task: the broker knows a job was taken by the pipe it wrote it to
(no unread bytes left), which the worker's code cannot fake. ``leftovers``
names what a task left behind in its worker (a thread, a child process, a changed signal
handler...): that worker is retired before it takes another task.
"""

from __future__ import annotations

import reprlib
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import (
    Annotated,
    Any,
    Final,
    Generic,
    Literal,
    NotRequired,
    TypedDict,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
)

import msgpack

from pbt_server.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 1 << 20
MAX_TEXT: Final = 4096  # page names, record ids, context values
MAX_PARAMETERS: Final = 4096  # entries in a parameters or results map
MAX_CONTEXT: Final = 64  # entries in a session's context map
INT64_MAX: Final = (1 << 63) - 1
_HEADER: Final = struct.Struct(">I")

Message = dict[str, Any]


class ErrorLevel(StrEnum):
    """How an error that the page's error trigger did not handle is surfaced."""

    IGNORE = "Ignore"
    WARNING = "Warning"
    ERROR = "Error"


# --- framing ------------------------------------------------------------------------------


_packers = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer: building one per message costs as much as the packing."""
    try:
        packer: msgpack.Packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_frame(message: Mapping[str, object]) -> bytes:
    """Pack ``message`` as one length-prefixed frame."""
    body = _packer().pack(message)
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

    @property
    def announced(self) -> int:
        """The length the partial frame's header announces (0 if no header is complete):
        what this connection is about to make the broker buffer."""
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return 0
        (length,) = _HEADER.unpack_from(buffer, 0)
        return int(length)

    def feed(self, data: bytes) -> Iterator[Message]:
        """Add ``data``; iterate over every frame it completes.

        Frames before a malformed one are yielded first, then :class:`ProtocolError` is
        raised, so a good request in the same read as garbage is still answered. Iterate to
        the end (or stop using the decoder): the buffer is trimmed when iteration finishes.
        """
        if not self._buffer:
            return self._direct(data)
        self._buffer += data
        return self._frames()

    def _direct(self, data: bytes) -> Iterator[Message]:
        """The frames of ``data`` when nothing was pending (the usual read): unpacked from
        it as it is; only a partial frame at its end is kept, in the buffer."""
        offset = 0
        size = len(data)
        try:
            while size - offset >= _HEADER.size:
                (length,) = _HEADER.unpack_from(data, offset)
                if length == 0 or length > self.max_frame:
                    raise ProtocolError(
                        f"frame of {length} bytes refused (limit {self.max_frame} bytes)"
                    )
                end = offset + _HEADER.size + length
                if size < end:
                    break
                message = self._unpack(data[offset + _HEADER.size : end])
                offset = end
                yield message
        finally:
            if offset < size:
                self._buffer += memoryview(data)[offset:]

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

    def _unpack(self, body: memoryview | bytes) -> Message:
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, **self._limits)
        except Exception as err:  # msgpack raises ValueError, TypeError, StackError, ...
            raise ProtocolError(f"frame is not valid msgpack: {err}") from err
        if not isinstance(message, dict):
            raise ProtocolError(f"frame must hold a map, not {type(message).__name__}")
        if not isinstance(message.get("op"), str):
            raise ProtocolError("frame has no 'op' string")
        return message


# --- field checks -----------------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


def brief(value: object) -> str:
    """A short, bounded repr of untrusted input (a plain repr of a value nested 1000 deep
    raises RecursionError; of a large one, builds the whole text first)."""
    return _REPR.repr(value)


@dataclass(frozen=True, slots=True)
class Field:
    """How a declared field is checked: ``check`` raises ValueError saying what is wrong."""

    kind: str  # for the generated tables
    check: Callable[[object], None]


def _id(value: object) -> None:
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise ValueError(f"must be a non-negative int64, got {brief(value)}")


def _int_or_nil(value: object) -> None:
    if value is not None and (type(value) is not int or abs(value) > INT64_MAX):
        raise ValueError(f"must be an int64 or nil, got {brief(value)}")


def _id_or_nil(value: object) -> None:
    if value is not None:
        _id(value)


def _text(value: object) -> None:
    if type(value) is not str:
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"is longer than {MAX_TEXT} characters")


def _long_text(value: object) -> None:
    if type(value) is not str:
        raise ValueError(f"must be a string, got {type(value).__name__}")


def _bool(value: object) -> None:
    if type(value) is not bool:
        raise ValueError(f"must be a bool, got {brief(value)}")


def _text_map(value: object) -> None:
    if type(value) is not dict:
        raise ValueError(f"must be a map of text to text, got {type(value).__name__}")
    if len(value) > MAX_PARAMETERS:
        raise ValueError(f"has {len(value)} entries; at most {MAX_PARAMETERS}")
    for key, item in value.items():
        if type(key) is not str or type(item) is not str:
            raise ValueError(f"entry {brief(key)} is not text -> text")


def _context(value: object) -> None:
    _text_map(value)
    assert isinstance(value, dict)
    if len(value) > MAX_CONTEXT:
        raise ValueError(f"has {len(value)} entries; at most {MAX_CONTEXT}")
    for key, item in value.items():
        if len(key) > MAX_TEXT or len(item) > MAX_TEXT:
            raise ValueError(f"entry {brief(key)} is longer than {MAX_TEXT} characters")


def _list_of(check: Callable[[object], None]) -> Callable[[object], None]:
    def checked(value: object) -> None:
        if type(value) is not list:
            raise ValueError(f"must be a list, got {type(value).__name__}")
        for item in value:
            check(item)

    return checked


def _map(value: object) -> None:
    if type(value) is not dict:
        raise ValueError(f"must be a map, got {type(value).__name__}")


def _maps(value: object) -> None:
    if type(value) is not list or not all(type(item) is dict for item in value):
        raise ValueError(f"must be a list of maps, got {brief(value)}")


def _anything(value: object) -> None:
    pass


Id = Annotated[int, Field("id", _id)]
IntOrNil = Annotated[int | None, Field("int|nil", _int_or_nil)]
IdOrNil = Annotated[int | None, Field("id|nil", _id_or_nil)]
Text = Annotated[str, Field("text", _text)]
LongText = Annotated[str, Field("long text", _long_text)]
Bool = Annotated[bool, Field("bool", _bool)]
TextMap = Annotated[dict[str, str], Field("{text: text}", _text_map)]
Context = Annotated[dict[str, str], Field("{text: text}", _context)]
Ids = Annotated[list[int], Field("[id]", _list_of(_id))]
Texts = Annotated[list[str], Field("[text]", _list_of(_text))]
Map = Annotated[dict[str, Any], Field("map", _map)]
Maps = Annotated[list[dict[str, Any]], Field("[map]", _maps)]
# Enqueue parameters are checked by the scheduler: bad ones fail the enqueue with
# InvalidParameters, they do not break the connection.
Anything = Annotated[object, Field("any", _anything)]


# --- channels: the declared messages of one direction, and their validation ---------------

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class _Shape:
    cls: type
    fields: tuple[tuple[str, Field], ...]  # every field but op, in declaration order
    required: tuple[tuple[str, Field], ...]
    optional: tuple[tuple[str, Field], ...]
    allowed: frozenset[str]


def _shape(cls: type) -> _Shape:
    hints = get_type_hints(cls, include_extras=True)
    fields: list[tuple[str, Field]] = []
    # Read from the hints: with postponed annotations, __optional_keys__ misses NotRequired.
    optional_names: set[str] = set()
    for name, hint in hints.items():
        if name == "op":
            continue
        if get_origin(hint) is NotRequired:
            (hint,) = get_args(hint)
            optional_names.add(name)
        specs = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Field)]
        if len(specs) != 1:
            raise TypeError(f"{cls.__name__}.{name}: declare its type as one of the field kinds")
        fields.append((name, specs[0]))
    return _Shape(
        cls,
        tuple(fields),
        tuple(f for f in fields if f[0] not in optional_names),
        tuple(f for f in fields if f[0] in optional_names),
        frozenset(hints),
    )


def op_of(cls: type) -> str:
    """The ``op`` a message class declares (its ``Literal``)."""
    hint = get_type_hints(cls)["op"]
    (op,) = get_args(hint)
    return str(op)


class Channel(Generic[M]):
    """The messages that may travel one way, keyed by ``op``; validates incoming ones."""

    def __init__(self, name: str, *classes: type) -> None:
        self.name = name
        self.shapes: dict[str, _Shape] = {op_of(cls): _shape(cls) for cls in classes}

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def validate(self, message: Message) -> M:
        """Check ``message`` against its declaration; raise ProtocolError naming the fault."""
        op = message.get("op")
        shape = self.shapes.get(op) if type(op) is str else None
        if shape is None:
            raise ProtocolError(f"unknown {self.name} op {brief(op)}")
        return cast(M, check_shape(shape, str(op), message))

    def shape(self, op: str) -> _Shape:
        return self.shapes[op]


def check_shape(shape: _Shape, op: str, message: Message) -> Message:
    if not message.keys() <= shape.allowed:
        unknown = sorted(message.keys() - shape.allowed)
        raise ProtocolError(f"{op}: unknown field(s) {brief(unknown)}")
    for name, spec in shape.required:
        try:
            value = message[name]
        except KeyError:
            raise ProtocolError(f"{op}: missing field {name!r}") from None
        try:
            spec.check(value)
        except ValueError as err:
            raise ProtocolError(f"{op}: field {name!r} {err}") from None
    for name, spec in shape.optional:
        if name in message:
            try:
                spec.check(message[name])
            except ValueError as err:
                raise ProtocolError(f"{op}: field {name!r} {err}") from None
    return message


# --- client -> broker requests ------------------------------------------------------------


class Hello(TypedDict):
    """The first request on a connection: protocol version, token (TCP), the session's
    context (copied into every task as ``ctx.context``), and whether it is an operator's
    connection (``status`` and ``ping`` only; never counted against ``MaxConnections``)."""

    op: Literal["hello"]
    rid: Id
    protocol: Id
    token: NotRequired[Text]
    context: NotRequired[Context]
    operator: NotRequired[Bool]


class OpenPage(TypedDict):
    op: Literal["open_page"]
    rid: Id
    name: Text
    record: Text


class SetRecord(TypedDict):
    op: Literal["set_record"]
    rid: Id
    page: Id
    record: Text


class ClosePage(TypedDict):
    op: Literal["close_page"]
    rid: Id
    page: Id


class Enqueue(TypedDict):
    op: Literal["enqueue"]
    rid: Id
    page: Id
    codeunit: Id
    parameters: Anything
    timeout: IntOrNil
    level: Text


class Cancel(TypedDict):
    op: Literal["cancel"]
    rid: Id
    task: Id


class Ping(TypedDict):
    op: Literal["ping"]
    rid: Id


class Status(TypedDict):
    op: Literal["status"]
    rid: Id


class Reload(TypedDict):
    """An operator's: re-read server.ini and import the codeunit modules afresh."""

    op: Literal["reload"]
    rid: Id


Request = Union[Hello, OpenPage, SetRecord, ClosePage, Enqueue, Cancel, Ping, Status, Reload]  # noqa: UP007
REQUESTS: Final = Channel[Request](
    "request", Hello, OpenPage, SetRecord, ClosePage, Enqueue, Cancel, Ping, Status, Reload
)
OPERATOR_OPS: Final = frozenset({"hello", "ping", "status", "reload"})


# --- broker -> client: replies (by the request's op), events ------------------------------


class HelloReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    session: Id
    server: Text
    max_frame: Id  # the largest frame the broker accepts, and the largest it sends


class OpenPageReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    page: Id


class CancelledReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    cancelled: Ids


class EnqueueReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    task: Id
    timeout: Id  # after defaulting and clamping


class CancelReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    cancelled: Bool


class EmptyReply(TypedDict):
    op: Literal["reply"]
    rid: Id


class StatusReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    server: Map
    totals: Map
    sessions: Maps
    workers: Maps


class ReloadReply(TypedDict):
    op: Literal["reply"]
    rid: Id
    codeunits: Ids  # registered by the new code
    restart: Texts  # changed keys a reload cannot apply: "[Section] Key"
    seconds: Map  # {"trial": s, "total": s}: importing in the trial process, the whole reload


REPLIES: Final[dict[str, _Shape]] = {
    "hello": _shape(HelloReply),
    "open_page": _shape(OpenPageReply),
    "set_record": _shape(CancelledReply),
    "close_page": _shape(CancelledReply),
    "enqueue": _shape(EnqueueReply),
    "cancel": _shape(CancelReply),
    "ping": _shape(EmptyReply),
    "status": _shape(StatusReply),
    "reload": _shape(ReloadReply),
}


def validate_reply(request_op: str, message: Message) -> Message:
    """Check a ``reply`` frame against the reply declared for ``request_op``."""
    return check_shape(REPLIES[request_op], f"reply to {request_op}", message)


class Completed(TypedDict):
    op: Literal["completed"]
    task: Id
    page: Id
    results: TextMap


class Failed(TypedDict):
    op: Literal["failed"]
    task: Id
    page: Id
    code: Text
    text: LongText
    stack: LongText


class Cancelled(TypedDict):
    op: Literal["cancelled"]
    task: Id
    page: Id
    code: Text  # the CancelReason
    text: LongText


class Progress(TypedDict):
    """A running task's latest progress; never after its outcome."""

    op: Literal["progress"]
    task: Id
    page: Id
    progress: TextMap


class Shutdown(TypedDict):
    op: Literal["shutdown"]
    code: Text
    text: LongText


class Error(TypedDict):
    """The answer to a request that failed; ``rid`` nil when the connection as a whole is
    refused or broke the protocol (then it is closed)."""

    op: Literal["error"]
    rid: IdOrNil
    code: Text
    text: LongText


Event = Union[Completed, Failed, Cancelled, Progress, Shutdown, Error]  # noqa: UP007
EVENTS: Final = Channel[Event]("event", Completed, Failed, Cancelled, Progress, Shutdown, Error)


# --- broker <-> worker pipe messages ------------------------------------------------------


class Run(TypedDict):
    op: Literal["run"]
    job: Id
    codeunit: Id
    parameters: TextMap
    task: Id
    session: Id
    record: Text
    timeout: Id
    context: Context


class Ready(TypedDict):
    op: Literal["ready"]
    gen: Id
    pid: Id


class BootFailure(TypedDict):
    op: Literal["boot_failed"]
    gen: Id
    text: LongText


class TaskProgress(TypedDict):
    op: Literal["progress"]
    gen: Id
    job: Id
    progress: TextMap


class Done(TypedDict):
    op: Literal["done"]
    gen: Id
    job: Id
    results: TextMap
    leftovers: NotRequired[Texts]


class TaskFailure(TypedDict):
    op: Literal["failed"]
    gen: Id
    job: Id
    code: Text
    text: LongText
    stack: LongText
    leftovers: NotRequired[Texts]


class Tried(TypedDict):
    """The reload's trial process imported the new code and opened the database."""

    op: Literal["tried"]
    gen: Id
    codeunits: Ids
    files: Texts  # the imported modules' source files (what ``run --reload`` watches)


ToWorker = Run
FromWorker = Union[Ready, BootFailure, TaskProgress, Done, TaskFailure]  # noqa: UP007
FROM_WORKER: Final = Channel[FromWorker](
    "worker message", Ready, BootFailure, TaskProgress, Done, TaskFailure
)
MAX_PROGRESS: Final = 4096  # bytes of a task's progress, packed
TO_WORKER: Final = Channel[ToWorker]("job", Run)
FromTrial = Union[Tried, BootFailure]  # noqa: UP007
FROM_TRIAL: Final = Channel[FromTrial]("trial message", Tried, BootFailure)

PIPE_BUFFER: Final = 64 << 20  # what a worker buffers of the broker's jobs, at most


def pipe_unpacker(max_buffer: int = PIPE_BUFFER) -> msgpack.Unpacker:
    """A streaming unpacker for one pipe, buffering at most ``max_buffer`` bytes."""
    return msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=max_buffer, max_bin_len=0, max_ext_len=0
    )


def pack(message: Mapping[str, object]) -> bytes:
    return _packer().pack(message)


# --- the docstring's tables, generated from the declarations ------------------------------


def _fields_text(shape: _Shape, *, rid: bool = False) -> str:
    optional = {name for name, _ in shape.optional}
    parts = [
        f"{name}{'?' if name in optional else ''}: {spec.kind}"
        for name, spec in shape.fields
        if rid or name != "rid"
    ]
    return ", ".join(parts) or "-"


def _wrap_fields(text: str, width: int) -> list[str]:
    """Lines of at most ``width``, broken only between fields."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + len(part) + 2 <= width:
            lines[-1] += ", " + part
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return lines


def _table(
    headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], widths: tuple[int, ...]
) -> str:
    rule = " ".join("=" * w for w in widths)
    last = widths[-1]
    lines = [rule, " ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append(rule)
    for row in rows:
        head = " ".join(c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True))
        wrapped = _wrap_fields(row[-1], last)
        indent = " " * (len(head) + 1)
        lines.append(f"{head} {wrapped[0]}".rstrip())
        lines += [f"{indent}{more}" for more in wrapped[1:]]
    lines.append(rule)
    return "\n".join(lines)


def describe() -> dict[str, str]:
    """The docstring's tables, by name, as generated from the declarations."""
    wide = (11, 77)
    requests = [(op, _fields_text(shape)) for op, shape in REQUESTS.shapes.items()]
    replies = [(op, _fields_text(shape)) for op, shape in REPLIES.items()]
    events = [(op, _fields_text(shape, rid=True)) for op, shape in EVENTS.shapes.items()]
    pipe = [(op, "to worker", _fields_text(s)) for op, s in TO_WORKER.shapes.items()]
    pipe += [(op, "from worker", _fields_text(s)) for op, s in FROM_WORKER.shapes.items()]
    pipe += [(op, "from trial", _fields_text(s)) for op, s in FROM_TRIAL.shapes.items()]
    return {
        "requests": _table(("request", "fields"), requests, wide),
        "replies": _table(("reply to", "fields"), replies, wide),
        "events": _table(("event", "fields"), events, wide),
        "pipe": _table(("message", "direction", "fields"), pipe, (11, 14, 62)),
    }
