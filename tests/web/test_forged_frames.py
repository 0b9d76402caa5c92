"""Forged browser frames get a clear error, close only their own tab, and harm no other.

A bare WebSocket client plays the attacker against the real uvicorn server, while a real
browser tab with a running task looks on.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests import codeunits as cu
from tests.support import wait_until
from tests.web.conftest import DemoBroker, web_config
from tests.web.harness import broker_sessions, enqueue, open_test_page
from tests.web.server import WebServer
from tests.web.wsclient import fatal, hello, open_socket, read_to_close, request, run, send

LIMIT = 65536
ENQUEUE: dict[str, Any] = {
    "op": "enqueue",
    "rid": 2,
    "page": 0,  # filled in
    "codeunit": cu.ECHO,
    "parameters": {},
    "timeout": None,
    "level": "Error",
}

# (name, message after hello and open_page, what the error text must say)
FATAL: list[tuple[str, object, str]] = [
    ("huge parameters", {**ENQUEUE, "parameters": {"x": "y" * 70_000}}, "limit 65536 bytes"),
    ("codeunit as text", {**ENQUEUE, "codeunit": "50100"}, "'codeunit' must be a non-negative"),
    ("codeunit as float", {**ENQUEUE, "codeunit": 1.5}, "'codeunit' must be a non-negative"),
    ("boolean rid", {**ENQUEUE, "rid": True}, "'rid' must be a non-negative integer"),
    ("number parameter", {**ENQUEUE, "parameters": {"Wait": 1000}}, "'Wait' must be a string"),
    ("parameters as list", {**ENQUEUE, "parameters": ["a"]}, "must be an object, got an array"),
    ("fractional timeout", {**ENQUEUE, "timeout": 1.5}, "must be milliseconds or null"),
    ("unknown level", {**ENQUEUE, "level": "Loud"}, "must be one of Error, Ignore, Warning"),
    ("missing field", {k: v for k, v in ENQUEUE.items() if k != "level"}, "missing field 'level'"),
    ("extra field", {**ENQUEUE, "admin": True}, "unknown field(s) ['admin']"),
    ("unknown op", {"op": "run_sql", "rid": 2}, "unknown op 'run_sql'"),
    ("rid not increasing", {**ENQUEUE, "rid": 1}, "rid 1 is not larger than the last (1)"),
    ("second hello", {"op": "hello", "protocol": 1}, "said hello already"),
    ("not JSON", "enqueue 50100 please", "message is not JSON"),
    ("JSON array", [1, 2, 3], "must be a JSON object, not an array"),
    ("deep nesting", "[" * 60_000 + "]" * 60_000, "limit 65536 bytes"),
    ("big number", '{"op": "ping", "rid": ' + "9" * 5000 + "}", "message is not JSON"),
    ("binary", b"\x00\x01", "binary WebSocket messages are not accepted"),
    (
        "lone surrogate",
        '{"op": "set_record", "rid": 2, "page": 1, "record": "\\ud800"}',
        "field 'record' holds a lone surrogate",
    ),
    ("surrogate key", {**ENQUEUE, "parameters": {"\ud800": "x"}}, "holds a lone surrogate"),
]


async def _forged_tab(server: WebServer, message: object) -> tuple[dict[str, Any], int | None]:
    """Say hello, open a page, send ``message``; return the fatal error and the close code."""
    socket = await open_socket(server.ws_url, server.url)
    await hello(socket)
    page = await request(socket, {"op": "open_page", "rid": 1, "name": "Evil", "record": ""})
    if isinstance(message, dict) and message.get("page") == 0:
        message = {**message, "page": page["page"]}
    if isinstance(message, bytes):
        await socket.send(message)
    else:
        await socket.send(message if isinstance(message, str) else json.dumps(message))
    return fatal(await read_to_close(socket)), socket.close_code


def test_forged_frames_close_only_their_own_tab(demo_broker: DemoBroker, web: WebServer, context):
    broker = demo_broker.broker
    page, session_id = open_test_page(context, web.url)
    running = enqueue(page, cu.SLEEP, {"seconds": "2"})
    before = broker_sessions(broker)

    async def attack() -> list[tuple[str, dict[str, Any], int | None]]:
        return [(name, *await _forged_tab(web, message)) for name, message, _ in FATAL]

    for (name, error, code), (_, _, text) in zip(run(attack()), FATAL, strict=True):
        assert (error["op"], error["rid"], error["code"]) == ("error", None, "ProtocolError"), name
        assert text in error["text"], (name, error["text"])
        assert code == 4400, name
    # Every forged tab's session is gone; the browser's is untouched and its task completes.
    wait_until(lambda: broker_sessions(broker) == before)
    assert len(web.bridge.tabs) == 1
    page.wait_for_function("h.completed.length === 1", timeout=10_000)
    assert page.evaluate("h.completed[0][0]") == running
    assert page.evaluate("h.closed") == []
    assert page.evaluate("session.id") == session_id
    page.close()


def test_requests_the_browser_may_not_make_fail_without_closing(web: WebServer):
    async def main() -> None:
        socket = await open_socket(web.ws_url, web.url)
        await hello(socket)
        opened = await request(socket, {"op": "open_page", "rid": 1, "name": "P", "record": ""})
        refused = await request(socket, {**ENQUEUE, "page": opened["page"], "codeunit": 50999})
        assert (refused["op"], refused["rid"], refused["code"]) == (
            "error",
            2,
            "CodeunitNotAllowed",
        )
        assert "codeunit 50999 is not allowed" in refused["text"]
        missing = await request(socket, {**ENQUEUE, "rid": 3, "page": 999})
        assert (missing["code"], missing["text"]) == (
            "PageNotFound",
            "enqueue: this session has no open page 999",
        )
        # The tab goes on.
        accepted = await request(socket, {**ENQUEUE, "rid": 4, "page": opened["page"]})
        assert (accepted["op"], accepted["task"]) == ("reply", 1)
        assert (await request(socket, {"op": "ping", "rid": 5}))["op"] == "reply"
        await send(socket, {"op": "close"})
        rest = await read_to_close(socket)
        assert [m["op"] for m in rest] in ([], ["completed"])  # the echo may finish first
        assert socket.close_code == 1000

    run(main())
    wait_until(lambda: not web.bridge.tabs)


@pytest.mark.parametrize(
    ("origin", "first", "text", "code"),
    [
        ("http://evil.example", None, "pages from 'http://evil.example' may not connect", 4403),
        (None, None, "pages from None may not connect", 4403),
        ("same", {"op": "ping", "rid": 1}, "ping before hello; say hello first", 4400),
        ("same", {"op": "hello", "protocol": 2}, "protocol 2 is not supported", 4400),
        ("same", {"op": "hello", "protocol": 1, "resume": "forged"}, "the session ended", 4410),
        ("same", {"op": "hello", "protocol": 1, "seq": 5}, "seq without resume", 4400),
    ],
    ids=["wrong-origin", "no-origin", "before-hello", "protocol", "forged-resume", "seq"],
)
def test_bad_handshakes_are_refused(web: WebServer, origin, first, text: str, code: int):
    async def main() -> tuple[dict[str, Any], int | None]:
        socket = await open_socket(web.ws_url, web.url if origin == "same" else origin)
        if first is not None:
            await send(socket, first)
        return fatal(await read_to_close(socket)), socket.close_code

    error, close_code = run(main())
    assert text in error["text"], error
    assert close_code == code
    assert not web.bridge.tabs


def test_a_message_past_the_websocket_limit_ends_the_tab_at_once(
    demo_broker: DemoBroker, start_web
):
    server = start_web(web_config(demo_broker.broker, reconnect_grace_ms=30_000))

    async def main() -> int | None:
        socket = await open_socket(server.ws_url, server.url, max_size=None)
        await hello(socket)
        with contextlib.suppress(ConnectionClosed):  # past ws_max_size: closed unread
            await socket.send("x" * (5 << 20))
        await read_to_close(socket)
        return socket.close_code

    assert run(main()) == 1009
    # Well before the 30 s grace: a socket closed for breaking the rules is not a blip.
    wait_until(lambda: not server.bridge.tabs, timeout=10)
