"""A bare WebSocket client that speaks the bridge protocol by hand (for forged frames)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` in a thread of its own: Playwright's sync API holds this one's loop."""
    outcome: list[Any] = []

    def main() -> None:
        try:
            outcome.append(asyncio.run(coroutine))
        except BaseException as exc:
            outcome.append(exc)
            outcome.append(None)

    thread = threading.Thread(target=main, name="ws-client")
    thread.start()
    thread.join()
    if len(outcome) == 2:
        raise outcome[0]
    result: T = outcome[0]
    return result


async def open_socket(url: str, origin: str | None, **options: Any) -> ClientConnection:
    return await connect(
        url,
        origin=Origin(origin) if origin else None,
        proxy=None,
        compression=None,
        open_timeout=10,
        **options,
    )


async def send(socket: ClientConnection, message: dict[str, Any]) -> None:
    await socket.send(json.dumps(message))


async def receive(socket: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        message: dict[str, Any] = json.loads(await socket.recv())
    return message


async def read_to_close(socket: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes the socket (within 10 s)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        try:
            while True:
                messages.append(json.loads(await socket.recv()))
        except ConnectionClosed:
            return messages


def fatal(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The fatal error (``rid`` null) among what came before the close."""
    [error] = [m for m in messages if m["op"] == "error" and m["rid"] is None]
    return error


async def hello(
    socket: ClientConnection, resume: str | None = None, seq: int = 0
) -> dict[str, Any]:
    await send(socket, {"op": "hello", "protocol": 1, "resume": resume, "seq": seq})
    welcome = await receive(socket)
    assert welcome["op"] == "welcome", welcome
    return welcome


async def request(socket: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send a request; return its reply or error (events in between are skipped)."""
    await send(socket, message)
    while True:
        answer = await receive(socket)
        if answer.get("rid") == message["rid"] or answer["op"] == "error":
            return answer
