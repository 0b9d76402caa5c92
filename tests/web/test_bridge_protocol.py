"""The bridge's protocol from a bare WebSocket client: resume, acks, takeover, many tabs."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.support import wait_until
from tests.web.conftest import DemoBroker, web_config
from tests.web.harness import broker_sessions
from tests.web.server import WebServer
from tests.web.wsclient import hello, open_socket, read_to_close, receive, request, run, send

ENQUEUE: dict[str, Any] = {"op": "enqueue", "codeunit": cu.SLEEP, "timeout": None}


async def _tab(server: WebServer, **options: Any) -> tuple[ClientConnection, dict[str, Any]]:
    socket = await open_socket(server.ws_url, server.url, **options)
    return socket, await hello(socket)


async def _closed(socket: ClientConnection) -> tuple[dict[str, Any] | None, int | None]:
    """The fatal error (if any) before the socket closed, and its close code."""
    messages = await read_to_close(socket)
    errors = [m for m in messages if m["op"] == "error" and m["rid"] is None]
    return (errors[0] if errors else None), socket.close_code


def _idle(broker: BrokerProcess) -> bool:
    return not any(w["task"] for w in broker.status()["workers"])


def test_a_resume_sends_again_what_the_browser_missed(demo_broker: DemoBroker, web: WebServer):
    async def main() -> None:
        first, welcome = await _tab(web)
        assert welcome["resumed"] is False
        assert welcome["grace"] == 1500
        page = await request(first, {"op": "open_page", "rid": 1, "name": "P", "record": "R"})
        params = {"seconds": "0.3"}
        reply = await request(
            first,
            {**ENQUEUE, "rid": 2, "page": page["page"], "parameters": params, "level": "Error"},
        )
        first.transport.abort()  # the network breaks: no close frame
        await asyncio.to_thread(wait_until, lambda: _idle(demo_broker.broker))
        second = await open_socket(web.ws_url, web.url)
        await send(
            second, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": reply["seq"]}
        )
        again = await receive(second)
        assert again["op"] == "welcome"
        assert again["resumed"] is True
        assert (again["session"], again["rid"]) == (welcome["session"], 2)
        completed = await receive(second)
        assert (completed["op"], completed["task"]) == ("completed", reply["task"])
        assert completed["seq"] == reply["seq"] + 1
        assert completed["results"]["slept"] == "0.3"
        await send(second, {"op": "close"})
        await _closed(second)

    run(main())
    wait_until(lambda: not web.bridge.tabs)


def test_a_resume_cannot_ask_for_what_was_acknowledged(web: WebServer):
    async def main() -> None:
        first, welcome = await _tab(web)
        for rid in (1, 2, 3):
            await request(first, {"op": "ping", "rid": rid})
        await send(first, {"op": "ack", "seq": 3})
        await request(first, {"op": "ping", "rid": 4})  # the ack has been read
        first.transport.abort()
        second = await open_socket(web.ws_url, web.url)
        await send(second, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": 1})
        error, code = await _closed(second)
        assert error is not None
        assert error["code"] == "SessionExpired"
        assert "messages 2..3 of this session are gone" in error["text"]
        assert code == 4410
        # Asking for what it has not seen is a lie: a protocol error (that session has ended).
        third = await open_socket(web.ws_url, web.url)
        await send(third, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": 99})
        error, code = await _closed(third)
        assert error is not None
        assert error["code"] == "SessionExpired"

    run(main())
    wait_until(lambda: not web.bridge.tabs)


def test_a_resume_takes_over_a_connection_the_server_still_thinks_open(web: WebServer):
    async def main() -> None:
        old, welcome = await _tab(web)
        new = await open_socket(web.ws_url, web.url)
        await send(new, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": 0})
        assert (await receive(new))["resumed"] is True
        _, code = await _closed(old)
        assert code == 4409
        assert (await request(new, {"op": "ping", "rid": 1}))["op"] == "reply"
        await send(new, {"op": "close"})
        await _closed(new)

    run(main())
    wait_until(lambda: not web.bridge.tabs)


def test_a_resume_by_another_user_is_refused(web: WebServer):
    async def main() -> None:
        alice, welcome = await _tab(web)
        alice.transport.abort()
        bob = await open_socket(web.ws_url, web.url, additional_headers={"Cookie": "user=bob"})
        await send(bob, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": 0})
        error, code = await _closed(bob)
        assert error is not None
        assert (error["code"], code) == ("AccessDenied", 4403)
        # Alice herself still may, inside the grace window.
        back = await open_socket(web.ws_url, web.url)
        await send(back, {"op": "hello", "protocol": 1, "resume": welcome["token"], "seq": 0})
        assert (await receive(back))["resumed"] is True
        await send(back, {"op": "close"})
        await _closed(back)

    run(main())
    wait_until(lambda: not web.bridge.tabs)


def test_the_broker_going_away_closes_every_tab_with_the_reason(start_broker, start_web):
    broker = start_broker()
    server = start_web(web_config(broker))

    async def main() -> list[tuple[dict[str, Any] | None, int | None]]:
        tabs = [(await _tab(server))[0] for _ in range(3)]
        await asyncio.to_thread(broker.stop)
        return [await _closed(tab) for tab in tabs]

    for error, code in run(main()):
        assert error is not None
        assert (error["code"], code) == ("ConnectionLost", 4502)
        assert error["text"].startswith("pbt-server: the server shut down: "), error
    wait_until(lambda: not server.bridge.tabs)


TABS = 1000


def test_a_thousand_idle_tabs_are_a_thousand_sessions(demo_broker: DemoBroker, web: WebServer):
    broker = demo_broker.broker
    before = broker_sessions(broker)

    async def main() -> set[int]:
        sockets = await asyncio.gather(*(_tab(web) for _ in range(TABS)))
        ids = {welcome["session"] for _, welcome in sockets}
        assert len(web.bridge.tabs) == TABS
        assert len(await asyncio.to_thread(broker_sessions, broker) - before) == TABS
        for socket, _ in sockets:
            await send(socket, {"op": "close"})
        await asyncio.gather(*(_closed(socket) for socket, _ in sockets))
        return ids

    assert len(run(main())) == TABS
    wait_until(lambda: not web.bridge.tabs)
    wait_until(lambda: broker_sessions(broker) == before)
