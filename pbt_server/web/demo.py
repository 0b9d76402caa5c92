"""``pbt-server demo --web``: the Role Center and the Customer Card as real web pages.

``/`` is the Role Center: five cues over the demo database, each ``-`` until its page
background task completes. ``/customer`` is the Customer Card: pick a customer from the list
(``setRecord``) and codeunit 50100 fills Before / Duration / After in the background; errors
show as notifications. The bridge is mounted at ``/pbt``, as an application would mount it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from pbt_server.config import ServerConfig
from pbt_server.demo import ensure_database, running_broker
from pbt_server.demo_ids import DEMO_CODEUNITS
from pbt_server.web.access import Access, Authorize
from pbt_server.web.app import create_app
from pbt_server.web.serve import serve

_PAGES = resources.files("pbt_server.web").joinpath("pages")
_FILES = {
    "/": ("role-center.html", "text/html; charset=utf-8"),
    "/customer": ("customer-card.html", "text/html; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
    "/notifications.js": ("notifications.js", "text/javascript; charset=utf-8"),
}


def demo_authorize(request: HTTPConnection) -> Access:
    """Everyone is the demo user of CRONUS and may run the demo's codeunits."""
    return Access(codeunits=DEMO_CODEUNITS, context={"user": "demo", "company": "CRONUS"})


def create_demo_app(config: ServerConfig, authorize: Authorize = demo_authorize) -> Starlette:
    """The demo's pages, with the bridge mounted at ``/pbt``."""

    def page(path: str, name: str, media_type: str) -> Route:
        body = _PAGES.joinpath(name).read_bytes()

        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return Route(path, endpoint)

    routes: list[Route | Mount] = []
    for path, (name, media_type) in _FILES.items():
        routes.append(page(path, name, media_type))
    routes.append(Route("/favicon.ico", _no_icon))
    bridge = create_app(config, authorize=authorize)
    routes.append(Mount("/pbt", bridge))

    app = Starlette(routes=routes, lifespan=bridge.router.lifespan_context)
    app.state.bridge = bridge.state.bridge
    return app


async def _no_icon(request: Request) -> Response:
    return Response(status_code=204)


def main(config: ServerConfig, config_path: Path | None, host: str, port: int) -> int:
    ensure_database(config)
    with running_broker(config, config_path) as started:
        if not started:
            print(f"using the pbt-server already running on {config.server.socket_path}")
        url = f"http://{host}:{port}/"
        print(f"Role Center:   {url}\nCustomer Card: {url}customer\n(Ctrl-C stops)", flush=True)
        serve(create_demo_app(config), host=host, port=port, config=config)
    return 0
