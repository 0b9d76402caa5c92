"""The browser wire format and the Origin rule, without sockets."""

from __future__ import annotations

import json

import pytest

from pbt_server.errors import ProtocolError
from pbt_server.web.access import Access, origin_allowed
from pbt_server.web.messages import Ack, Cancel, Close, Enqueue, Hello, OpenPage, parse


def _parse(message: object, limit: int = 65536):
    return parse(json.dumps(message), limit)


def test_requests_parse_into_their_types():
    assert _parse({"op": "hello", "protocol": 1}) == (Hello(None, 0), None)
    assert _parse({"op": "hello", "protocol": 1, "resume": "t", "seq": 7}) == (Hello("t", 7), None)
    assert _parse({"op": "open_page", "rid": 1, "name": "N", "record": "R", "ack": 3}) == (
        OpenPage(1, "N", "R"),
        3,
    )
    enqueue = {"op": "enqueue", "rid": 2, "page": 1, "codeunit": 50100}
    enqueue |= {"parameters": {"Wait": "1"}, "timeout": -5, "level": "Warning"}
    assert _parse(enqueue) == (Enqueue(2, 1, 50100, {"Wait": "1"}, -5, "Warning"), None)
    assert _parse({"op": "cancel", "rid": 3, "page": 1, "task": 9, "ack": None}) == (
        Cancel(3, 1, 9),
        None,
    )
    assert _parse({"op": "ack", "seq": 4}) == (Ack(4), None)
    assert _parse({"op": "close"}) == (Close(), None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{}", "binary WebSocket messages are not accepted; send JSON text"),
        (None, "binary WebSocket messages are not accepted; send JSON text"),
        ("x" * 2000, "message of 2000 bytes refused (limit 1024 bytes)"),
        ("é" * 600, "message of 1200 bytes refused (limit 1024 bytes)"),
        ("{", "message is not JSON: Expecting property name"),
        ("null", "message must be a JSON object, not null"),
        ('{"op": 5}', "unknown op 5"),
        ('{"rid": 1}', "unknown op None"),
        ('{"op": "hello", "protocol": 1, "seq": -1}', "'seq' must be a non-negative integer"),
        ('{"op": "hello", "protocol": 1, "resume": 7}', "'resume' must be a string, got a number"),
        ('{"op": "ping", "rid": 1, "ack": "x"}', "'ack' must be a non-negative integer"),
        ('{"op": "ping", "rid": 1.0}', "'rid' must be a non-negative integer, got 1.0"),
        ('{"op": "ping", "rid": 9223372036854775808}', "must be a non-negative integer"),
        ('{"op": "close", "why": 1}', "close: unknown field(s) ['why']"),
        ('{"op": "open_page", "rid": 1, "name": "n"}', "open_page: missing field 'record'"),
    ],
)
def test_bad_messages_name_what_is_wrong(data: object, reason: str):
    with pytest.raises(ProtocolError) as caught:
        parse(data, 1024)  # type: ignore[arg-type]
    assert reason in caught.value.text


def test_long_texts_are_refused():
    with pytest.raises(ProtocolError, match="'name' is longer than 4096 characters"):
        _parse({"op": "open_page", "rid": 1, "name": "n" * 4097, "record": ""})


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "verdict"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", (), True),
        ("https://erp.example.com", "erp.example.com", (), True),
        ("https://erp.example.com", "ERP.example.com:443", (), True),
        ("http://erp.example.com", "erp.example.com:80", (), True),
        ("https://erp.example.com", "erp.example.com:8443", (), False),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", (), False),
        ("http://evil.example", "erp.example.com", (), False),
        ("null", "erp.example.com", (), False),
        (None, "erp.example.com", (), False),
        ("http://a:b", "a", (), False),
        ("https://app.example.com", "bridge.internal:8000", ("https://app.example.com",), True),
        ("https://APP.example.com/", "x", ("https://app.example.com",), True),
        (
            "http://bridge.internal:8000",
            "bridge.internal:8000",
            ("https://app.example.com",),
            False,
        ),
    ],
)
def test_origin_rule(origin: str | None, host: str, allowed: tuple[str, ...], verdict: bool):
    assert origin_allowed(origin, host, allowed) is verdict


def test_access_checks_its_values():
    assert Access({50100}, {"user": "u"}) == Access(frozenset({50100}), {"user": "u"})
    with pytest.raises(TypeError, match="codeunits must hold ints"):
        Access({"50100"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="context must map str to str"):
        Access(context={"user": 1})  # type: ignore[dict-item]
