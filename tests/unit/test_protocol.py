"""Framing and request validation, byte by byte."""

from __future__ import annotations

import struct

import msgpack
import pytest

import pbt_server.protocol as protocol
from pbt_server.errors import ProtocolError
from pbt_server.protocol import EVENTS, FROM_WORKER, REQUESTS, FrameDecoder, encode_frame


def test_frames_split_anywhere_are_reassembled():
    stream = b"".join(encode_frame({"op": "ping", "rid": i}) for i in range(50))
    decoder = FrameDecoder()
    got: list[dict[str, object]] = []
    for i in range(0, len(stream), 7):
        got += decoder.feed(stream[i : i + 7])
    assert [m["rid"] for m in got] == list(range(50))
    assert decoder.pending == 0


def test_oversize_frame_is_refused_from_its_header():
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(ProtocolError, match="2000000 bytes refused"):
        list(decoder.feed(struct.pack(">I", 2_000_000)))  # no body needed


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must hold a map"),
        (msgpack.packb({"rid": 1}), "no 'op'"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
        (msgpack.packb({"op": "ping", "b": b"x"}), "not valid msgpack"),
        (b"\x91" * 5000 + b"\xc0", "not valid msgpack"),
    ],
)
def test_malformed_bodies_are_protocol_errors(body, error):
    with pytest.raises(ProtocolError, match=error):
        list(FrameDecoder().feed(struct.pack(">I", len(body)) + body))


def test_good_frames_before_a_bad_one_are_delivered_first():
    stream = encode_frame({"op": "ping", "rid": 1}) + struct.pack(">I", 1) + b"\xc1"
    frames = FrameDecoder().feed(stream)
    assert next(frames) == {"op": "ping", "rid": 1}
    with pytest.raises(ProtocolError):
        next(frames)


def test_zero_length_frame_is_refused():
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(b"\x00\x00\x00\x00"))


def test_requests_are_validated_against_their_declarations():
    hello = {"op": "hello", "rid": 1, "protocol": 1}
    assert REQUESTS.validate(hello) is hello  # a message is the dict itself: no copy
    enqueue = {
        "op": "enqueue",
        "rid": 2,
        "page": 1,
        "codeunit": 9,
        "parameters": {},
        "timeout": None,
        "level": "Error",
    }
    request = REQUESTS.validate(enqueue)
    assert request["op"] == "enqueue"
    assert request["codeunit"] == 9


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "launch", "rid": 1}, "unknown request op 'launch'"),
        ({"op": "cancel", "rid": 1}, "missing field 'task'"),
        ({"op": "cancel", "rid": 1, "task": "1"}, "non-negative int64"),
        ({"op": "cancel", "rid": 1, "task": -1}, "non-negative int64"),
        ({"op": "cancel", "rid": 1, "task": True}, "non-negative int64"),
        ({"op": "cancel", "rid": "x", "task": 1}, "'rid'"),
        ({"op": "ping", "rid": 1, "extra": 1}, "unknown field"),
        ({"op": "open_page", "rid": 1, "name": "x" * 5000, "record": ""}, "longer than"),
        ({"op": "open_page", "rid": 1, "name": 5, "record": ""}, "must be a string"),
        ({"op": "hello", "rid": 1, "protocol": 1, "operator": 1}, "must be a bool"),
        ({"op": "hello", "rid": 1, "protocol": 1, "context": {"a": 1}}, "not text -> text"),
        (
            {"op": "hello", "rid": 1, "protocol": 1, "context": {str(i): "" for i in range(65)}},
            "at most 64",
        ),
    ],
)
def test_bad_requests_name_what_is_wrong(message, error):
    with pytest.raises(ProtocolError, match=error):
        REQUESTS.validate(message)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "done", "gen": 1, "job": 2}, "done: missing field 'results'"),
        ({"op": "done", "gen": 1, "job": 2, "results": {"a": 1}}, "not text -> text"),
        ({"op": "done", "gen": 1, "job": 2, "results": [1]}, "must be a map"),
        ({"op": "failed", "gen": 1, "job": 2, "code": "X", "text": "t"}, "missing field 'stack'"),
        ({"op": "progress", "gen": -1, "job": 2, "progress": {}}, "'gen' must be a non-negative"),
        ({"op": "started", "gen": 1, "job": 2}, "unknown worker message op 'started'"),
        ({"op": "hijack", "gen": 1}, "unknown worker message op 'hijack'"),
    ],
)
def test_worker_messages_are_validated_like_client_frames(message, error):
    with pytest.raises(ProtocolError, match=error):
        FROM_WORKER.validate(message)


def test_events_are_validated_for_the_client():
    with pytest.raises(ProtocolError, match="completed: field 'task'"):
        EVENTS.validate({"op": "completed", "task": "1", "page": 3, "results": {}})


def _docstring_tables(doc: str) -> dict[str, str]:
    """The tables that follow each ``.. name (generated)`` line of the module docstring."""
    tables: dict[str, str] = {}
    lines = doc.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(".. ") and line.endswith("(generated)"):
            body, rules = [], 0
            for row in lines[i + 2 :]:
                body.append(row)
                if row.startswith("=") and set(row) <= {"=", " "}:
                    rules += 1
                    if rules == 3:
                        break
            tables[line.split()[1]] = "\n".join(body)
    return tables


def test_the_protocol_docstring_is_the_declarations():
    assert protocol.__doc__ is not None
    documented = _docstring_tables(protocol.__doc__)
    assert documented == protocol.describe(), (
        "pbt_server/protocol.py's tables drifted from its declarations; paste describe()'s"
    )


def test_the_readme_lists_every_code_the_server_sends():
    from pathlib import Path

    from pbt_server.errors import render_markdown

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- codes:begin -->\n", "<!-- codes:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == render_markdown(), (
        "README.md's code tables drifted: paste"
        " `python -c 'from pbt_server.errors import render_markdown as r; print(r(), end=\"\")'`"
    )


def test_the_readme_lists_every_log_event():
    from pathlib import Path

    from pbt_server.events import render_markdown

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- events:begin -->\n", "<!-- events:end -->"
    assert text[text.index(begin) + len(begin) : text.index(end)] == render_markdown()
