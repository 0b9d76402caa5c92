"""``pbt-server web``: the bridge on its own, served by uvicorn."""

from __future__ import annotations

import signal

import uvicorn
from starlette.types import ASGIApp

from pbt_server.config import ServerConfig


def serve(app: ASGIApp, *, host: str, port: int, config: ServerConfig) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (uvicorn's loop: uvloop when installed).

    Either signal is a graceful stop and the command exits 0: uvicorn raises the signal
    again once it has shut down, and the handlers installed here take it.
    """
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _run(app, host, port, config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: object) -> None:
    """The signal uvicorn raises again after its graceful shutdown: nothing left to do."""


def _run(app: ASGIApp, host: str, port: int, config: ServerConfig) -> None:
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=config.server.log_level.lower(),
        # Messages up to 4x the limit still reach the bridge, which names the limit in its
        # error; larger ones are closed by the WebSocket layer (1009) before being buffered.
        ws_max_size=4 * config.web.max_message_bytes,
        lifespan="on",
    )


def main(
    config: ServerConfig, host: str, port: int, *, broker: tuple[str, int] | None = None
) -> int:
    """Serve the bridge for the broker on ``[Server] SocketPath``, or at ``broker`` over TCP
    (with ``[Server] AuthToken``)."""
    from pbt_server.web.app import create_app

    where = config.server.socket_path if broker is None else f"{broker[0]}:{broker[1]}"
    print(
        f"pbt-server web: http://{host}:{port}/pbt.js and ws://{host}:{port}/ws,"
        f" for the broker on {where}",
        flush=True,
    )
    serve(create_app(config, address=broker), host=host, port=port, config=config)
    return 0
