"""Hostile input on the live socket: an error frame, that connection closed, nothing else harmed."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest

from pbt_server.client import AuthenticationFailed, connect
from pbt_server.protocol import FrameDecoder, encode_frame
from tests import codeunits as cu


def _raw(broker) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(broker.socket))
    return sock


def _read_until_closed(sock: socket.socket) -> list[dict]:
    decoder = FrameDecoder(trusted=True)
    frames: list[dict[str, object]] = []
    while chunk := sock.recv(65536):
        frames += decoder.feed(chunk)
    sock.close()
    return frames


def _hello() -> bytes:
    return encode_frame({"op": "hello", "rid": 1, "protocol": 1, "token": ""})


def _body(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


CASES = {
    "random bytes": b"\x17\x99garbage\x00\x01" * 3,
    "huge length prefix": struct.pack(">I", 0xFFFFFFF0),
    "not a map": _body(msgpack.packb([1, 2, 3])),
    "reserved byte": _body(b"\xc1"),
    "deep nesting": _body(b"\x81\xa1a" * 3000 + b"\xc0"),
    "unknown op": encode_frame({"op": "format_disk", "rid": 2}),
    "wrong field type": encode_frame({"op": "cancel", "rid": 2, "task": "seven"}),
    "missing field": encode_frame({"op": "enqueue", "rid": 2, "page": 1}),
    "bin where text": _body(
        msgpack.packb({"op": "open_page", "rid": 2, "name": b"x", "record": ""})
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_frames_get_an_error_and_close_only_that_connection(broker, name):
    with broker.connect() as bystander:
        page = bystander.open_page("Bystander")
        slow = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
        sock = _raw(broker)
        sock.sendall(_hello() + CASES[name])
        frames = _read_until_closed(sock)
        assert frames[0]["op"] == "reply"  # hello was fine
        assert frames[-1]["op"] == "error"
        assert frames[-1]["code"] == "ProtocolError"
        assert frames[-1]["text"]
        # the other session and its accepted task are unharmed
        assert slow.result(timeout=10)["slept"] == "0.3"
        bystander.ping()


def test_oversize_frame_is_refused_before_its_body(broker):
    sock = _raw(broker)
    sock.sendall(_hello() + struct.pack(">I", 2 << 20))  # 2 MiB announced, never sent
    frames = _read_until_closed(sock)
    assert frames[-1]["code"] == "ProtocolError"
    assert "refused" in frames[-1]["text"]


def test_requests_before_hello_are_refused(broker):
    sock = _raw(broker)
    sock.sendall(encode_frame({"op": "ping", "rid": 9}))
    frames = _read_until_closed(sock)
    assert frames == [
        {
            "op": "error",
            "rid": 9,
            "code": "ProtocolError",
            "text": "ping before hello; say hello first",
        }
    ]


def test_another_sessions_task_id_is_just_unknown(broker):
    with broker.connect() as owner, broker.connect() as other:
        task = owner.open_page("P").enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
        assert other.open_page("Q").cancel_background_task(task.id) is False
        assert task.result(timeout=10)["slept"] == "0.3"


def test_tcp_requires_the_token(start_broker):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "a-secret-token-of-32-characters!"
    broker = start_broker({"Server": {"TcpAddress": f"127.0.0.1:{port}", "AuthToken": token}})
    with connect(("127.0.0.1", port), token=token) as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.ECHO, {"over": "tcp"}).result(timeout=10) == {
            "over": "tcp"
        }
    with pytest.raises(AuthenticationFailed):
        connect(("127.0.0.1", port), token="wrong-token-wrong-token-wrong!!")
    with pytest.raises(AuthenticationFailed):
        connect(("127.0.0.1", port))
    assert broker.status()["server"]["tcp"] == f"127.0.0.1:{port}"


def test_the_socket_is_private(broker):
    assert broker.socket.stat().st_mode & 0o777 == 0o600
