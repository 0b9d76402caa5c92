"""``create_dashboard_app()``: the broker's live dashboard, to mount in a web application.

The dashboard's files are served from this app; its ``api/status`` is fetched from the
broker's ``[Server] MetricsAddress`` (one small HTTP request per poll), so the broker must
have it set. Mount it behind the application's own authentication: it shows every worker
and the busiest sessions, which is for operators, not for every user.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pbt_server import dashboard
from pbt_server.config import ServerConfig, load_config

FETCH_TIMEOUT: Final = 3.0
MAX_ANSWER: Final = 4 << 20  # the status JSON of the 50 busiest sessions is a few KB


def create_dashboard_app(
    config: ServerConfig | str | os.PathLike[str] | None = None, *, metrics: str | None = None
) -> Starlette:
    """The dashboard at the mount point's root (``app.mount("/ops", create_dashboard_app())``).

    Args:
        config: a loaded configuration, or the path of a ``server.ini``; its ``[Server]
            MetricsAddress`` is where the broker's data comes from (an address bound to every
            interface, ``0.0.0.0`` or ``::``, is reached on the loopback).
        metrics: ``host:port`` of the broker's endpoint instead (say, another host's).
    """
    if not isinstance(config, ServerConfig):
        config = load_config(None if config is None else Path(config))
    host, port = _target(config, metrics)

    async def page(request: Request) -> Response:
        name = dashboard.FILES.get("/" + request.path_params.get("name", ""))
        if name is None:
            return Response("not found\n", 404, media_type="text/plain")
        data, content_type = dashboard.read_file(name)
        return Response(data, headers={"Cache-Control": "no-cache", "Content-Type": content_type})

    async def status(request: Request) -> Response:
        try:
            code, body = await asyncio.wait_for(_get(host, port, "/api/status"), FETCH_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as err:
            text = f"the broker's metrics endpoint {host}:{port} did not answer: {err or 'timeout'}"
            return Response(text + "\n", 503, media_type="text/plain")
        media = "application/json" if code == 200 else "text/plain"
        return Response(body, code, media_type=media, headers={"Cache-Control": "no-cache"})

    return Starlette(
        routes=[
            Route("/api/status", status),
            Route("/", page),
            Route("/{name:str}", page),
        ]
    )


def _target(config: ServerConfig, metrics: str | None) -> tuple[str, int]:
    if metrics is not None:
        named, _, number = metrics.rpartition(":")
        return named.strip("[]"), int(number)
    address = config.server.metrics_address
    if address is None or address[1] == 0:
        raise ValueError(
            "the dashboard needs the broker's [Server] MetricsAddress (with a fixed port),"
            " or metrics='host:port'"
        )
    host, port = address
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


async def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.0 GET (no client library needed for one local request)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        chunks, size = [], 0
        while chunk := await reader.read(1 << 16):
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError("the answer is too large")
            chunks.append(chunk)
    finally:
        writer.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(parts[1]), body
