"""``create_app()``: the bridge as a Starlette application, to mount or to run on its own."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from pbt_server.config import ServerConfig, load_config
from pbt_server.web.access import Authorize, default_authorize
from pbt_server.web.bridge import Bridge
from pbt_server.web.tab import Address

PBT_JS = resources.files("pbt_server.web").joinpath("static/pbt.js").read_bytes()
PBT_JS_ETAG = '"' + hashlib.sha256(PBT_JS).hexdigest()[:20] + '"'


def create_app(
    config: ServerConfig | str | os.PathLike[str] | None = None,
    *,
    authorize: Authorize | None = None,
    address: Address | None = None,
    token: str | None = None,
) -> Starlette:
    """The browser bridge: ``<mount>/pbt.js``, ``<mount>/ws`` and ``<mount>/close``.

    Mount it (``app.mount("/pbt", create_app(...))``) or serve it as it is
    (``pbt-server web``). Each tab's WebSocket becomes one parent session at the broker.

    Args:
        config: a loaded configuration, or the path of a ``server.ini``; ``None`` reads
            the built-in defaults and ``PBT_*`` variables. Its ``[Web]`` section sets the
            grace window, allowed origins, allowed codeunits and message size.
        authorize: ``authorize(request) -> Access | None`` (plain or async), called once per
            connection with the WebSocket's HTTP request. ``None`` gives every browser on an
            allowed origin ``Access(codeunits=[Web] AllowedCodeunits)``.
        address: the broker; default ``[Server] SocketPath``.
        token: the broker's ``AuthToken`` for a TCP address; default ``[Server] AuthToken``.

    Returns:
        The ASGI app; ``app.state.bridge`` is its :class:`~pbt_server.web.bridge.Bridge`.
    """
    if not isinstance(config, ServerConfig):
        config = load_config(None if config is None else Path(config))
    web = config.web
    if address is None:
        address = str(config.server.socket_path)
    if token is None:
        token = config.server.auth_token if isinstance(address, tuple) else ""
    bridge = Bridge(
        address,
        token=token,
        authorize=authorize or default_authorize(web.allowed_codeunits),
        grace=web.reconnect_grace_ms / 1000,
        allowed_origins=web.allowed_origins,
        max_message=web.max_message_bytes,
    )

    async def script(request: Request) -> Response:
        # Revalidated on every load (an upgraded server may speak a newer protocol), but a
        # tab whose copy is current gets a 304 instead of the script.
        headers = {
            "Cache-Control": "no-cache",
            "ETag": PBT_JS_ETAG,
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("if-none-match") == PBT_JS_ETAG:
            return Response(status_code=304, headers=headers)
        return Response(PBT_JS, media_type="text/javascript; charset=utf-8", headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Runs when the bridge is the server's app; a host app that mounts it should call
        # ``await bridge.aclose()`` in its own lifespan (or let process exit end the sessions).
        yield
        await bridge.aclose()

    app = Starlette(
        routes=[
            Route("/pbt.js", script),
            WebSocketRoute("/ws", bridge.websocket),
            Route("/close", bridge.close_beacon, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.bridge = bridge
    return app
