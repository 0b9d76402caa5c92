"""Framing and request validation, byte by byte."""

from __future__ import annotations

import struct

import msgpack
import pytest

from pbt_server.errors import ProtocolError
from pbt_server.protocol import Enqueue, FrameDecoder, Hello, encode_frame, parse_request


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


def test_requests_are_validated_into_dataclasses():
    assert parse_request({"op": "hello", "rid": 1, "protocol": 1}) == Hello(1, 1, "")
    request = parse_request(
        {
            "op": "enqueue",
            "rid": 2,
            "page": 1,
            "codeunit": 9,
            "parameters": {},
            "timeout": None,
            "level": "Error",
        }
    )
    assert isinstance(request, Enqueue)
    assert request.codeunit == 9


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "launch", "rid": 1}, "unknown op"),
        ({"op": "cancel", "rid": 1}, "missing field 'task'"),
        ({"op": "cancel", "rid": 1, "task": "1"}, "non-negative int64"),
        ({"op": "cancel", "rid": 1, "task": -1}, "non-negative int64"),
        ({"op": "cancel", "rid": 1, "task": True}, "non-negative int64"),
        ({"op": "cancel", "rid": "x", "task": 1}, "'rid'"),
        ({"op": "ping", "rid": 1, "extra": 1}, "unknown field"),
        ({"op": "open_page", "rid": 1, "name": "x" * 5000, "record": ""}, "longer than"),
        ({"op": "open_page", "rid": 1, "name": 5, "record": ""}, "must be a string"),
    ],
)
def test_bad_requests_name_what_is_wrong(message, error):
    with pytest.raises(ProtocolError, match=error):
        parse_request(message)
