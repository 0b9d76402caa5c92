"""Protocol fuzzing against a live broker: hostile frames get an error frame or a closed
connection, and nothing else is harmed (SPEC §6a, §7; issue 4 §3).

One broker serves the whole module. Alongside every example:

- a *bystander* session keeps tasks in flight and checks each result is its own; it must
  never see a failure and must keep making progress;
- a *prober* connection pings after every example: the loop must answer within a bound;
- the broker's RSS after the module is compared with its RSS before; its log must hold no
  traceback (an exception escaping a handler closes a connection silently).

Each example opens its own raw connection, optionally says hello, sends the hostile bytes
and a sentinel ``ping``, half-closes, and reads until the broker closes. The oracle walks
the sent bytes with the framing rules: every complete frame before a fatal error gets
exactly one answer (``reply`` or ``error``), in order; a fatal ``ProtocolError`` is the last
frame; an oversize header is refused; nothing arrives that does not parse.

``scripts/fuzz.py`` runs this module with more examples (``PBT_FUZZ_EXAMPLES``,
``PBT_FUZZ_SCALE``); ``CASES`` counts the examples each test ran.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pbt_server import server
from pbt_server.client import Session
from pbt_server.errors import known_codes
from pbt_server.protocol import REQUESTS, FrameDecoder, encode_frame
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.support import wait_until

MAX_FRAME: Final = 65536  # small, so oversize and near-limit frames stay cheap
# Before hello the broker reads smaller frames (nobody unauthenticated makes it buffer much).
HELLO_MAX_FRAME: Final[int] = server.HELLO_MAX_FRAME
DEFAULT_TIMEOUT_MS: Final = 120_000
MAX_TIMEOUT_MS: Final = 600_000
PING_BOUND: Final = 5.0  # seconds the prober's ping may take (a loaded 2-core machine)
READ_BOUND: Final = 20.0  # seconds for the broker to answer and close a fuzz connection
RSS_GROWTH_MB: Final = 40.0
# scripts/fuzz.py: PBT_FUZZ_EXAMPLES sets every test's examples, PBT_FUZZ_SCALE scales them.
EXAMPLES: Final = int(os.environ.get("PBT_FUZZ_EXAMPLES", "0"))
SCALE: Final = float(os.environ.get("PBT_FUZZ_SCALE", "1"))
INT64_MAX: Final = (1 << 63) - 1

KNOWN_CODES: Final = known_codes()  # every code the server may send
FATAL: Final = frozenset({"ProtocolError", "AuthenticationFailed", "NotAllowed"})
ANSWER_OPS: Final = frozenset({"reply", "error"})
EVENT_OPS: Final = frozenset({"completed", "failed", "cancelled", "shutdown"})
SENTINEL_RID: Final = 987_654_321
TOKEN: Final = "fuzz-token-of-at-least-16-chars"

CASES: collections.Counter[str] = collections.Counter()


def examples(n: int) -> int:
    return EXAMPLES or max(1, int(n * SCALE))


# --- the live environment --------------------------------------------------------------------


class Bystander:
    """A well-behaved session that keeps tasks in flight while the fuzzing runs."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.session: Session = broker.connect()
        self.page = self.session.open_page("Bystander", record_id="B")
        self.completed = 0
        self.failures: list[str] = []
        self.in_flight: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-bystander")
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            batch = []
            for _ in range(4):
                n += 1
                params = {"who": "bystander", "n": str(n)}
                codeunit = cu.ECHO if n % 3 else cu.SLEEP
                if codeunit == cu.SLEEP:
                    params["seconds"] = "0.01"
                try:
                    task = self.page.enqueue_background_task(codeunit, params, timeout=60_000)
                except Exception as err:
                    self.failures.append(f"enqueue {n}: {err!r}")
                    return
                batch.append((task, params, codeunit))
            self.in_flight = [task.id for task, _, _ in batch]
            for task, params, codeunit in batch:
                try:
                    results = task.result(timeout=60)
                except Exception as err:
                    self.failures.append(f"task {task.id} {params}: {err!r}")
                    continue
                expected = params if codeunit == cu.ECHO else {"slept": "0.01"}
                if {k: results.get(k) for k in expected} != expected:
                    self.failures.append(f"task {task.id} {params} returned {results}")
                else:
                    self.completed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.session.close()


class RawConnection:
    """A plain socket speaking (or not) the broker's framing."""

    def __init__(self, address: str | tuple[str, int], token: str = "") -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=READ_BOUND)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(READ_BOUND)
            self.sock.connect(address)
        self.token = token
        self.decoder = FrameDecoder(1 << 24, trusted=True)
        self.frames: collections.deque[dict[str, Any]] = collections.deque()
        self.eof = False

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def next_frame(self, deadline: float) -> dict[str, Any] | None:
        """The next frame from the broker; None at end of stream."""
        while not self.frames and not self.eof:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                raise AssertionError(
                    f"the broker neither answered nor closed within {READ_BOUND} s"
                ) from None
            if not data:
                self.eof = True
            else:
                self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft() if self.frames else None

    def read_to_end(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + READ_BOUND
        frames = []
        while (frame := self.next_frame(deadline)) is not None:
            frames.append(frame)
        assert self.decoder.pending == 0, "the broker's last frame was cut short"
        return frames

    def hello(self) -> int:
        self.send(encode_frame({"op": "hello", "rid": 1, "protocol": 1, "token": self.token}))
        reply = self.next_frame(time.monotonic() + READ_BOUND)
        assert reply is not None
        assert reply["op"] == "reply", reply
        return int(reply["session"])

    def close(self) -> None:
        self.sock.close()


class Prober:
    """A hello'd connection that pings: the broker's loop must answer within a bound."""

    def __init__(self, path: str) -> None:
        self.connection = RawConnection(path)
        self.connection.hello()
        self.rid = 1
        self.slowest = 0.0

    def ping(self) -> float:
        self.rid += 1
        started = time.monotonic()
        self.connection.send(encode_frame({"op": "ping", "rid": self.rid}))
        frame = self.connection.next_frame(started + PING_BOUND)
        elapsed = time.monotonic() - started
        assert frame == {"op": "reply", "rid": self.rid}, frame
        assert elapsed < PING_BOUND, f"ping took {elapsed:.2f} s"
        self.slowest = max(self.slowest, elapsed)
        return elapsed


@dataclass
class FuzzEnv:
    broker: BrokerProcess
    bystander: Bystander
    prober: Prober
    rss_before: int
    tcp: tuple[str, int]
    log_offset: int = 0
    progress_mark: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return str(self.broker.socket)

    def connect(self, tcp: bool = False) -> RawConnection:
        return RawConnection(self.tcp, TOKEN) if tcp else RawConnection(self.path)

    def after_example(self, name: str) -> None:
        CASES[name] += 1
        self.prober.ping()
        assert not self.bystander.failures, self.bystander.failures

    def start_test(self) -> None:
        self.progress_mark = self.bystander.completed

    def end_test(self) -> None:
        """The bystander kept going through the whole test, and nothing was logged amiss."""
        assert not self.bystander.failures, self.bystander.failures
        mark = self.progress_mark
        wait_until(lambda: self.bystander.completed > mark, timeout=60)
        log = self.broker.log_text()
        for needle in ("Traceback", "Fatal error", "Exception in callback"):
            assert needle not in log, log[log.index(needle) - 2000 : log.index(needle) + 3000]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def env() -> Iterator[FuzzEnv]:
    tcp = ("127.0.0.1", _free_port())
    broker = BrokerProcess.start(
        {
            "Server": {
                "MaxFrameBytes": str(MAX_FRAME),
                "LogLevel": "INFO",
                "TcpAddress": f"{tcp[0]}:{tcp[1]}",
                "AuthToken": TOKEN,
            },
            "Workers": {"Count": "2"},
        }
    )
    bystander: Bystander | None = None
    prober: Prober | None = None
    try:
        bystander = Bystander(broker)
        prober = Prober(str(broker.socket))
        wait_until(lambda: bystander is not None and bystander.completed >= 8, timeout=30)
        rss_before = psutil.Process(broker.pid).memory_info().rss
        fuzz = FuzzEnv(broker, bystander, prober, rss_before, tcp)
        yield fuzz
        rss_after = psutil.Process(broker.pid).memory_info().rss
        growth = (rss_after - rss_before) / 2**20
        assert growth < RSS_GROWTH_MB, f"broker RSS grew {growth:.1f} MB during the fuzzing"
        assert not bystander.failures, bystander.failures
        prober.ping()
        print(
            f"\nfuzz cases: {dict(CASES)}; bystander completed {bystander.completed} tasks; "
            f"slowest ping {prober.slowest * 1000:.0f} ms; broker RSS {rss_before / 2**20:.1f} "
            f"-> {rss_after / 2**20:.1f} MB"
        )
    finally:
        if prober is not None:
            prober.connection.close()
        if bystander is not None:
            bystander.stop()
    try:
        assert broker.stop() == 0, broker.log_text()
    finally:
        broker.cleanup()


@pytest.fixture
def fuzz(env: FuzzEnv) -> Iterator[FuzzEnv]:
    env.start_test()
    yield env
    env.end_test()


# --- the oracle ------------------------------------------------------------------------------


def walk(stream: bytes, *, said_hello: bool) -> tuple[list[bytes], str]:
    """Split ``stream`` as the broker must: complete bodies, then how it ends.

    Ends ``clean`` (exactly at a frame boundary), ``partial`` (a frame cut short: the broker
    waits for the rest, then sees our EOF) or ``refused`` (a length of 0 or over the limit).
    Before hello the limit is ``HELLO_MAX_FRAME``; the first frame then is hello, or fatal.
    """
    bodies: list[bytes] = []
    offset = 0
    while len(stream) - offset >= 4:
        (length,) = struct.unpack_from(">I", stream, offset)
        limit = MAX_FRAME if said_hello or bodies else HELLO_MAX_FRAME
        if length == 0 or length > limit:
            return bodies, "refused"
        if len(stream) - offset - 4 < length:
            return bodies, "partial"
        bodies.append(stream[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return bodies, "clean" if offset == len(stream) else "partial"


def body_rid(body: bytes) -> object:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return None
    return message.get("rid") if isinstance(message, dict) else None


def check_answers(stream: bytes, answers: list[dict[str, Any]], *, said_hello: bool) -> None:
    """Every complete frame answered once, in order, until a fatal error ends it all."""
    bodies, end = walk(stream, said_hello=said_hello)
    for frame in answers:
        assert isinstance(frame, dict), frame
        assert frame.get("op") in ANSWER_OPS | EVENT_OPS, frame
        if frame["op"] == "error":
            assert type(frame.get("code")) is str, frame
            assert frame["code"] in KNOWN_CODES, frame
            assert type(frame.get("text")) is str, frame
            assert frame["text"], frame
    replies = [frame for frame in answers if frame["op"] in ANSWER_OPS]
    fatal = [i for i, f in enumerate(replies) if f["op"] == "error" and f["code"] in FATAL]
    if fatal:
        assert fatal[0] == len(replies) - 1, f"frames after a fatal error: {replies}"
        assert answers[-1] is replies[-1], f"frames after a fatal error: {answers}"
        limit = len(bodies) + (end == "refused")
        assert len(replies) <= limit, f"{len(replies)} answers to {limit} frames: {replies}"
        answered = replies[:-1]
    else:
        assert end != "refused", f"an oversize or empty frame was not refused: {replies}"
        assert len(replies) == len(bodies), (
            f"{len(bodies)} complete frames, {len(replies)} answers (a silent close?): {replies}"
        )
        answered = replies
    for reply, body in zip(answered, bodies, strict=False):
        rid = body_rid(body)
        if type(rid) is int and 0 <= rid <= INT64_MAX:
            assert reply.get("rid") == rid, (reply, rid)


def exchange(
    fuzz: FuzzEnv, payload: bytes, *, hello: bool, tcp: bool = False
) -> list[dict[str, Any]]:
    """Send ``payload`` (plus a sentinel ping), half-close, return what the broker said."""
    connection = fuzz.connect(tcp)
    try:
        if hello:
            connection.hello()
        stream = payload + encode_frame({"op": "ping", "rid": SENTINEL_RID})
        connection.send(stream)
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_WR)
        answers = connection.read_to_end()
    finally:
        connection.close()
    check_answers(stream, answers, said_hello=hello)
    return answers


# --- strategies ---------------------------------------------------------------------------------

# A valid value for each field kind of the declared requests, and where an op needs more.
_VALID_BY_KIND: Final[dict[str, object]] = {
    "id": 1,
    "text": "R1",
    "int|nil": 1000,
    "any": {"k": "v"},
    "{text: text}": {"k": "v"},
    "bool": False,
}
_VALID_FOR: Final[dict[str, dict[str, object]]] = {
    "hello": {"protocol": 1, "token": ""},
    "open_page": {"name": "Fuzz"},
    "set_record": {"record": "R2"},
    "enqueue": {"codeunit": cu.ECHO, "level": "Error"},
}


def _template(op: str) -> dict[str, object]:
    shape = REQUESTS.shape(op)
    fields = {name: _VALID_BY_KIND[spec.kind] for name, spec in shape.required if name != "rid"}
    return {**fields, **_VALID_FOR.get(op, {})}


# Every declared request, valid: a new op is fuzzed as soon as it is declared.
TEMPLATES: Final[dict[str, dict[str, object]]] = {op: _template(op) for op in REQUESTS.ops}
FIELDS: Final = [(op, name) for op, fields in TEMPLATES.items() for name in ("op", "rid", *fields)]

edge_ints = st.sampled_from([-(1 << 63), -1, 0, 1, 2, INT64_MAX, 1 << 63, (1 << 64) - 1])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    edge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(min_size=4090, max_size=4200),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), children, max_size=6)
    ),
    max_leaves=24,
)


def pack(message: object) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    """A request of a known op, valid or with one field changed, removed or added."""
    op = draw(st.sampled_from(sorted(TEMPLATES)))
    message: dict[str, object] = {"op": op, "rid": draw(st.integers(0, 1000)), **TEMPLATES[op]}
    how = draw(st.sampled_from(["valid", "retype", "retype", "drop", "extra"]))
    if how == "retype":
        message[draw(st.sampled_from(sorted(message)))] = draw(values)
    elif how == "drop":
        del message[draw(st.sampled_from(sorted(message)))]
    elif how == "extra":
        message[draw(st.text(max_size=10))] = draw(values)
    return message


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame: well-formed, or broken in one of the ways a peer can break it."""
    kind = draw(
        st.sampled_from(
            ["request", "request", "request", "not_a_map", "garbage", "short", "long", "raw"]
        )
    )
    if kind == "request":
        return pack(draw(requests()))
    if kind == "not_a_map":
        return pack(draw(values.filter(lambda v: not isinstance(v, dict))))
    if kind == "garbage":
        body = draw(st.binary(min_size=1, max_size=200))
        return struct.pack(">I", len(body)) + body
    if kind == "raw":
        return draw(st.binary(max_size=64))
    frame = pack(draw(requests()))
    if kind == "short":  # the header claims fewer bytes than the body has
        cut = draw(st.integers(1, len(frame) - 4))
        return struct.pack(">I", cut) + frame[4:]
    extra = draw(st.integers(1, 64))  # the header claims more bytes than follow
    return struct.pack(">I", len(frame) - 4 + extra) + frame[4:]


HYPOTHESIS: Final = {
    "deadline": None,
    # The suite sees the same examples every run (deterministic CI); scripts/fuzz.py explores.
    "derandomize": not EXAMPLES,
    "database": None,
    # ``fuzz`` brackets the whole test (bystander progress, log check), not each example.
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
}


# --- the tests ----------------------------------------------------------------------------------


@settings(max_examples=examples(300), **HYPOTHESIS)  # type: ignore[arg-type]
@given(payload=st.binary(max_size=2048), hello=st.booleans(), tcp=st.booleans())
def test_random_bytes(fuzz: FuzzEnv, payload: bytes, hello: bool, tcp: bool) -> None:
    exchange(fuzz, payload, hello=hello, tcp=tcp)
    fuzz.after_example("random bytes")


@settings(max_examples=examples(300), **HYPOTHESIS)  # type: ignore[arg-type]
@given(sequence=st.lists(frames(), min_size=1, max_size=6), hello=st.booleans(), tcp=st.booleans())
def test_frame_sequences(fuzz: FuzzEnv, sequence: list[bytes], hello: bool, tcp: bool) -> None:
    exchange(fuzz, b"".join(sequence), hello=hello, tcp=tcp)
    fuzz.after_example("frame sequences")


@settings(max_examples=examples(150), **HYPOTHESIS)  # type: ignore[arg-type]
@given(message=requests(), data=st.data())
def test_truncated_frames(fuzz: FuzzEnv, message: dict[str, object], data: st.DataObject) -> None:
    frame = pack(message)
    cut = data.draw(st.integers(0, len(frame) - 1), label="cut")
    connection = RawConnection(fuzz.path)
    try:
        connection.hello()
        connection.send(frame[:cut])
        connection.sock.shutdown(socket.SHUT_WR)
        answers = connection.read_to_end()
    finally:
        connection.close()
    assert answers == [], f"a truncated frame was answered: {answers}"  # it was never whole
    fuzz.after_example("truncated frames")


@settings(max_examples=examples(40), **HYPOTHESIS)  # type: ignore[arg-type]
@given(
    length=st.one_of(
        st.just(0),
        st.integers(HELLO_MAX_FRAME + 1, MAX_FRAME),
        st.integers(MAX_FRAME + 1, (1 << 32) - 1),
        st.just(0xFFFFFFFF),
    ),
    hello=st.booleans(),
)
def test_length_prefixes_over_the_limit_are_refused(
    fuzz: FuzzEnv, length: int, hello: bool
) -> None:
    if hello and 0 < length <= MAX_FRAME:
        length += MAX_FRAME  # after hello the whole MaxFrameBytes is allowed
    connection = RawConnection(fuzz.path)
    try:
        if hello:
            connection.hello()
        connection.send(struct.pack(">I", length))  # no body, no half-close: the header suffices
        answers = connection.read_to_end()
    finally:
        connection.close()
    assert len(answers) == 1, answers
    assert answers[0]["op"] == "error", answers
    assert answers[0]["code"] == "ProtocolError", answers
    assert answers[0]["rid"] is None, answers
    fuzz.after_example("length prefixes")


def padded_ping(size: int) -> bytes:
    """A ping frame whose body is exactly ``size`` bytes (an unknown field pads it)."""
    pad = size - len(msgpack.packb({"op": "ping", "rid": 5, "pad": ""}))
    while True:
        body = msgpack.packb({"op": "ping", "rid": 5, "pad": "x" * pad}, use_bin_type=True)
        if len(body) <= size:
            break
        pad -= 1
    assert len(body) == size
    return struct.pack(">I", size) + body


@pytest.mark.parametrize("size", [MAX_FRAME - 1, MAX_FRAME])
def test_frames_at_the_limit_are_read(fuzz: FuzzEnv, size: int) -> None:
    """A frame of exactly MaxFrameBytes is read whole (and answered), not refused."""
    answers = exchange(fuzz, padded_ping(size), hello=True)
    assert answers[0]["op"] == "error", answers  # ping has no field 'pad'
    assert answers[0]["code"] == "ProtocolError", answers
    assert "pad" in answers[0]["text"], answers
    fuzz.after_example("frames at the limit")


def nested(depth: int, kind: str) -> bytes:
    if kind == "map":
        return b"\x81\xa1a" * depth + b"\xc0"
    if kind == "array":
        return b"\x91" * depth + b"\xc0"
    return b"\x81\xa1a\x91" * max(1, depth // 2) + b"\xc0"


@settings(max_examples=examples(40), **HYPOTHESIS)  # type: ignore[arg-type]
@given(
    depth=st.integers(1, 20_000),
    kind=st.sampled_from(["map", "array", "mixed"]),
    where=st.sampled_from(["body", "parameters", "name", "rid", "op"]),
)
def test_deep_nesting(fuzz: FuzzEnv, depth: int, kind: str, where: str) -> None:
    deep = nested(depth, kind)
    if where == "body":
        body = deep
    else:
        fields: dict[str, object] = (
            {"op": "enqueue", **TEMPLATES["enqueue"]}
            if where == "parameters"
            else {"op": "open_page", "name": "N", "record": "R"}
        )
        fields.setdefault("rid", 3)
        fields.pop(where, None)
        # A map header for the fields plus the nested one, then the nested value spliced in.
        body = bytes([0x80 | (len(fields) + 1)])
        body += b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
        body += msgpack.packb(where) + deep
    if len(body) > MAX_FRAME:
        body = body[:MAX_FRAME]
    page = pack({"op": "open_page", "rid": 2, "name": "Deep", "record": ""})
    answers = exchange(fuzz, page + struct.pack(">I", len(body)) + body, hello=True)
    assert answers[0] == {"op": "reply", "rid": 2, "page": 1}, answers
    if where == "parameters":  # a map of maps is never text -> text
        assert answers[1]["op"] == "error", answers
        assert answers[1]["code"] in ("InvalidParameters", "ProtocolError"), answers
    fuzz.after_example("deep nesting")


@settings(max_examples=examples(400), **HYPOTHESIS)  # type: ignore[arg-type]
@given(target=st.sampled_from(FIELDS), value=values, hello=st.booleans())
def test_wrong_types_in_every_field(
    fuzz: FuzzEnv, target: tuple[str, str], value: object, hello: bool
) -> None:
    op, name = target
    message: dict[str, object] = {"op": op, "rid": 7, **TEMPLATES[op]}
    message[name] = value
    answers = exchange(fuzz, pack(message), hello=hello)
    first = answers[0]
    assert first["op"] in ANSWER_OPS, answers
    if not hello and message["op"] != "hello":  # before hello, only a hello is answered
        assert first["op"] == "error", answers
        assert first["code"] == "ProtocolError", answers
    fuzz.after_example("wrong types")


@settings(max_examples=examples(60), **HYPOTHESIS)  # type: ignore[arg-type]
@given(
    token=st.one_of(st.text(max_size=64), st.just(TOKEN), st.just(TOKEN + "x"), values),
    protocol=st.one_of(st.just(1), values),
)
def test_tcp_hello_needs_the_token(fuzz: FuzzEnv, token: object, protocol: object) -> None:
    """Over TCP only a hello with protocol 1 and the exact token opens a session."""
    frame = pack({"op": "hello", "rid": 3, "protocol": protocol, "token": token})
    answers = exchange(fuzz, frame, hello=False, tcp=True)
    well_formed = (
        len(frame) - 4 <= HELLO_MAX_FRAME
        and type(token) is str
        and len(token) <= 4096
        and type(protocol) is int
        and 0 <= protocol <= INT64_MAX
    )
    if well_formed and protocol == 1 and token == TOKEN:
        assert answers[0]["op"] == "reply", answers
        assert answers[-1] == {"op": "reply", "rid": SENTINEL_RID}, answers
    else:
        code = "AuthenticationFailed" if well_formed and protocol == 1 else "ProtocolError"
        assert len(answers) == 1, answers
        assert answers[0]["op"] == "error", answers
        assert answers[0]["code"] == code, answers
    fuzz.after_example("tcp hello")


@settings(max_examples=examples(40), **HYPOTHESIS)  # type: ignore[arg-type]
@given(
    op=st.one_of(st.text(max_size=30).filter(lambda s: s not in TEMPLATES), values),
    hello=st.booleans(),
)
def test_unknown_operations(fuzz: FuzzEnv, op: object, hello: bool) -> None:
    answers = exchange(fuzz, pack({"op": op, "rid": 11}), hello=hello)
    assert answers[0]["op"] == "error", answers
    assert answers[0]["code"] == "ProtocolError", answers
    assert len([a for a in answers if a["op"] in ANSWER_OPS]) == 1, answers  # then closed
    fuzz.after_example("unknown operations")


@settings(max_examples=examples(40), **HYPOTHESIS)  # type: ignore[arg-type]
@given(
    sequence=st.lists(requests(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=40),
    pauses=st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.003]), min_size=1, max_size=40),
)
def test_frames_split_across_reads(
    fuzz: FuzzEnv, sequence: list[dict[str, object]], cuts: list[int], pauses: list[float]
) -> None:
    """However the bytes are split in time, the answers are those of the whole stream."""
    hello = encode_frame({"op": "hello", "rid": 1, "protocol": 1, "token": ""})
    stream = hello + b"".join(pack(message) for message in sequence)
    stream += encode_frame({"op": "ping", "rid": SENTINEL_RID})
    connection = RawConnection(fuzz.path)
    try:
        offset = 0
        for n, cut in enumerate(cuts * (len(stream) // sum(cuts) + 1)):
            if offset >= len(stream):
                break
            connection.send(stream[offset : offset + cut])
            offset += cut
            time.sleep(pauses[n % len(pauses)])  # the input's timing, not a wait for a result
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_WR)
        answers = connection.read_to_end()
    finally:
        connection.close()
    check_answers(stream, answers, said_hello=False)
    fuzz.after_example("split frames")


def test_a_flood_of_pipelined_requests_is_answered_in_order(fuzz: FuzzEnv) -> None:
    """A client that sends without reading is paused (backpressure), not buffered for."""
    count = 6000  # status replies of ~1 KiB: past the broker's 4 MiB write high-water mark
    frames = b"".join(encode_frame({"op": "status", "rid": 10 + i}) for i in range(count))
    connection = RawConnection(fuzz.path)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            connection.sock.sendall(frames)
        except BaseException as err:
            errors.append(err)

    try:
        connection.hello()
        writer = threading.Thread(target=write, name="fuzz-flood-writer")
        writer.start()
        try:
            # Not reading yet: the broker stops reading us, and keeps serving everyone else.
            for _ in range(5):
                fuzz.prober.ping()
            rss = psutil.Process(fuzz.broker.pid).memory_info().rss
            deadline = time.monotonic() + 60
            for i in range(count):
                frame = connection.next_frame(deadline)
                assert frame is not None, f"closed after {i} replies"
                assert frame["op"] == "reply", frame
                assert frame["rid"] == 10 + i, frame
        finally:
            writer.join(timeout=60)
        assert not errors, errors
        grown = (psutil.Process(fuzz.broker.pid).memory_info().rss - rss) / 2**20
        assert grown < RSS_GROWTH_MB, f"the broker grew {grown:.1f} MB while flooded"
    finally:
        connection.close()
    fuzz.after_example("pipelined flood")


@pytest.mark.parametrize(
    ("op", "name"),
    [("ping", "rid"), ("hello", "protocol"), ("cancel", "task"), ("set_record", "page")],
)
def test_a_value_nested_to_the_limit_in_an_int_field_is_a_protocol_error(
    fuzz: FuzzEnv, op: str, name: str
) -> None:
    """Just under msgpack's nesting limit, repr() of the bad value once overflowed the stack:
    InternalError and a traceback in the log, before hello (found by test_deep_nesting)."""
    for depth in (960, 990, 1000, 1010, 1020, 1023):
        fields: dict[str, object] = {"op": op, "rid": 4, **TEMPLATES[op]}
        fields.pop(name)
        body = bytes([0x80 | (len(fields) + 1)])
        body += b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
        body += msgpack.packb(name) + nested(depth, "map")
        answers = exchange(fuzz, struct.pack(">I", len(body)) + body, hello=op != "hello")
        assert len(answers) == 1, answers
        assert answers[0]["code"] == "ProtocolError", answers
        fuzz.after_example("nested to the limit")


def test_cancelling_another_sessions_task_ids_touches_nothing(fuzz: FuzzEnv) -> None:
    """Task ids are per session: another session's ids are unknown (or its own) here."""
    foreign = list(fuzz.bystander.in_flight)
    connection = RawConnection(fuzz.path)
    try:
        connection.hello()
        stream = b"".join(
            encode_frame({"op": "cancel", "rid": 100 + i, "task": task})
            for i, task in enumerate(foreign)
        )
        connection.send(stream)
        deadline = time.monotonic() + READ_BOUND
        replies = [connection.next_frame(deadline) for _ in foreign]
    finally:
        connection.close()
    assert replies == [
        {"op": "reply", "rid": 100 + i, "cancelled": False} for i in range(len(foreign))
    ]
    fuzz.after_example("foreign cancel")


# --- requests in any order: a model of one session ---------------------------------------------


@dataclass
class TaskModel:
    id: int
    page: int
    record: str
    codeunit: int
    parameters: dict[str, str]
    outcome: dict[str, Any] | None = None


class ProtocolMachine(RuleBasedStateMachine):
    """Valid frames in any order on one raw connection, checked against a model.

    Before hello every request is refused (fatal); hello twice is fatal; pages and tasks
    unknown to this session are errors that keep the connection; every accepted task gets
    exactly one outcome event, on its page; replies list exactly the tasks a request cancelled.
    """

    env: ClassVar[FuzzEnv]

    def __init__(self) -> None:
        super().__init__()
        self.connection: RawConnection | None = None
        self.reset()

    def reset(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = RawConnection(self.env.path)
        self.said_hello = False
        self.rid = 1
        self.pages: dict[int, str | None] = {}  # page id -> record; None once closed
        self.last_page = 0
        self.tasks: dict[int, TaskModel] = {}
        self.last_task = 0
        self.resolved_now: list[TaskModel] = []

    # --- talking ----------------------------------------------------------------------------

    def call(self, op: str, **fields: object) -> dict[str, Any] | None:
        """Send one request; return its answer (None: the broker closed the connection)."""
        assert self.connection is not None
        self.rid += 1
        rid = self.rid
        self.resolved_now = []
        CASES["request order (steps)"] += 1
        self.connection.send(encode_frame({"op": op, "rid": rid, **fields}))
        deadline = time.monotonic() + READ_BOUND
        while True:
            frame = self.connection.next_frame(deadline)
            if frame is None:
                return None
            if frame["op"] in ANSWER_OPS:
                assert frame.get("rid") == rid, (frame, rid)
                return frame
            self.on_event(frame)

    def on_event(self, frame: dict[str, Any]) -> None:
        assert frame["op"] in ("completed", "failed", "cancelled"), frame
        task = self.tasks.get(frame["task"])
        assert task is not None, f"an event for a task this session never had: {frame}"
        assert task.outcome is None, f"a second outcome for task {task.id}: {frame}"
        assert frame["page"] == task.page, frame
        task.outcome = frame
        self.resolved_now.append(task)
        if frame["op"] == "completed":
            if task.codeunit == cu.ECHO:
                assert frame["results"] == task.parameters, frame
            else:
                assert frame["results"]["slept"] == task.parameters["seconds"], frame
        elif frame["op"] == "failed":
            raise AssertionError(f"a well-behaved task failed: {frame}")

    def expect_error(self, answer: dict[str, Any] | None, code: str) -> None:
        assert answer is not None, f"connection closed instead of a {code} error"
        assert answer["op"] == "error", answer
        assert answer["code"] == code, answer

    def expect_fatal(self, answer: dict[str, Any] | None) -> None:
        self.expect_error(answer, "ProtocolError")
        assert self.connection is not None
        assert self.connection.next_frame(time.monotonic() + READ_BOUND) is None
        self.reset()

    def page_error(self, page: int) -> str | None:
        if page == 0 or page > self.last_page:
            return "PageNotFound"
        if self.pages[page] is None:
            return "PageClosed"
        return None

    # --- rules ------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        CASES["request order (runs)"] += 1

    @rule()
    def hello(self) -> None:
        answer = self.call("hello", protocol=1, token="")
        if self.said_hello:
            self.expect_fatal(answer)
            return
        assert answer is not None
        assert answer["op"] == "reply", answer
        assert type(answer["session"]) is int
        self.said_hello = True

    @precondition(lambda self: not self.said_hello)
    @rule(op=st.sampled_from(sorted(set(TEMPLATES) - {"hello"})))
    def request_before_hello(self, op: str) -> None:
        self.expect_fatal(self.call(op, **TEMPLATES[op]))

    @precondition(lambda self: self.said_hello)
    @rule(record=st.sampled_from(["", "A", "B"]))
    def open_page(self, record: str) -> None:
        answer = self.call("open_page", name="Order", record=record)
        assert answer is not None
        assert answer == {"op": "reply", "rid": self.rid, "page": self.last_page + 1}
        self.last_page += 1
        self.pages[self.last_page] = record

    @precondition(lambda self: self.said_hello)
    @rule(page=st.integers(0, 6), record=st.sampled_from(["", "A", "B"]))
    def set_record(self, page: int, record: str) -> None:
        answer = self.call("set_record", page=page, record=record)
        if (code := self.page_error(page)) is not None:
            self.expect_error(answer, code)
            return
        assert answer is not None
        assert answer["op"] == "reply", answer
        stale = [
            t
            for t in self.tasks.values()
            if t.page == page and t.record != record and not t.outcome
        ]
        assert not stale, f"tasks of the old record not ended by set_record: {stale}"
        cancelled = [
            t.id
            for t in self.resolved_now
            if t.outcome and t.outcome["op"] == "cancelled" and t.outcome["code"] == "RecordChanged"
        ]
        assert sorted(answer["cancelled"]) == sorted(cancelled), (answer, cancelled)
        self.pages[page] = record

    @precondition(lambda self: self.said_hello)
    @rule(page=st.integers(0, 6))
    def close_page(self, page: int) -> None:
        answer = self.call("close_page", page=page)
        if (code := self.page_error(page)) is not None:
            self.expect_error(answer, code)
            return
        assert answer is not None
        assert answer["op"] == "reply", answer
        assert not [t for t in self.tasks.values() if t.page == page and not t.outcome]
        cancelled = [
            t.id
            for t in self.resolved_now
            if t.outcome and t.outcome["op"] == "cancelled" and t.outcome["code"] == "PageClosed"
        ]
        assert sorted(answer["cancelled"]) == sorted(cancelled), (answer, cancelled)
        self.pages[page] = None

    @precondition(lambda self: self.said_hello and len(self.tasks) < 60)
    @rule(
        page=st.integers(0, 6),
        codeunit=st.sampled_from([cu.ECHO, cu.SLEEP, 424_242]),
        good_parameters=st.booleans(),
        timeout=st.one_of(st.none(), st.integers(-(1 << 63) + 1, INT64_MAX)),
        level=st.sampled_from(["Ignore", "Warning", "Error", "Fatal"]),
    )
    def enqueue(
        self, page: int, codeunit: int, good_parameters: bool, timeout: int | None, level: str
    ) -> None:
        parameters: dict[str, object] = (
            {"seconds": "0.02"} if codeunit == cu.SLEEP else {"n": str(self.rid)}
        )
        if not good_parameters:
            parameters["bad"] = 1
        answer = self.call(
            "enqueue",
            page=page,
            codeunit=codeunit,
            parameters=parameters,
            timeout=timeout,
            level=level,
        )
        code = self.page_error(page)
        if code is None and codeunit == 424_242:
            code = "UnknownCodeunit"
        if code is None and (not good_parameters or level == "Fatal"):
            code = "InvalidParameters"
        if code is not None:
            self.expect_error(answer, code)
            return
        if timeout is None or timeout <= 0:
            effective = DEFAULT_TIMEOUT_MS
        else:
            effective = min(timeout, MAX_TIMEOUT_MS)
        self.last_task += 1
        assert answer == {
            "op": "reply",
            "rid": self.rid,
            "task": self.last_task,
            "timeout": effective,
        }, answer
        record = self.pages[page]
        assert record is not None
        self.tasks[self.last_task] = TaskModel(
            self.last_task, page, record, codeunit, {k: str(v) for k, v in parameters.items()}
        )

    @precondition(lambda self: self.said_hello)
    @rule(task=st.integers(0, 12), foreign=st.booleans())
    def cancel(self, task: int, foreign: bool) -> None:
        if foreign and self.env.bystander.in_flight:
            task = self.env.bystander.in_flight[0]  # another session's id: means ours here
        answer = self.call("cancel", task=task)
        assert answer is not None
        assert answer["op"] == "reply", answer
        model = self.tasks.get(task)
        cancelled_now = [
            t
            for t in self.resolved_now
            if t.outcome and t.outcome["op"] == "cancelled" and t.outcome["code"] == "Canceled"
        ]
        if model is None:
            assert answer["cancelled"] is False, answer
            assert not cancelled_now
            return
        assert model.outcome is not None, f"task {task} not ended when cancel answered"
        assert answer["cancelled"] is any(t is model for t in cancelled_now), (answer, model)

    @precondition(lambda self: self.said_hello)
    @rule()
    def ping(self) -> None:
        assert self.call("ping") == {"op": "reply", "rid": self.rid}

    @precondition(lambda self: self.said_hello)
    @rule()
    def status(self) -> None:
        answer = self.call("status")
        assert answer is not None
        assert isinstance(answer["sessions"], list), answer
        assert isinstance(answer["workers"], list), answer

    @rule()
    def reconnect(self) -> None:
        self.reset()

    def teardown(self) -> None:
        connection = self.connection
        if connection is None:
            return
        try:
            if self.said_hello:
                deadline = time.monotonic() + 60
                while any(t.outcome is None for t in self.tasks.values()):
                    frame = connection.next_frame(deadline)
                    assert frame is not None, "the broker closed a well-behaved session"
                    self.on_event(frame)
        finally:
            connection.close()
            self.connection = None
        self.env.prober.ping()
        assert not self.env.bystander.failures, self.env.bystander.failures


def test_requests_in_any_order(fuzz: FuzzEnv) -> None:
    ProtocolMachine.env = fuzz
    run_state_machine_as_test(
        ProtocolMachine,
        settings=settings(
            max_examples=max(1, EXAMPLES // 5) if EXAMPLES else examples(60),
            stateful_step_count=40,
            deadline=None,
            derandomize=not EXAMPLES,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
