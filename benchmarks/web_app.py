"""The web app ``benchmarks/web_figures.py`` measures: the bridge at ``/pbt`` and two pages.

- ``/cues``: the Role Center's five cues without their demo delays; records when its session
  was connected (``window.connectedAt``) and when the last cue was filled
  (``window.filledAt``), epoch ms.
- ``/tabs?n=200``: ``n`` iframes of ``/cues``, each a tab of its own (its own ``window.pbt``,
  WebSocket and session).
- ``/rt``: ``roundTrips(n, codeunit)``: enqueue -> onCompleted, one after another; and
  ``echoTrips(n)`` over ``/echo``, a bare WebSocket echo in the same server (the floor:
  what Chromium and uvicorn cost before the bridge does anything).

Run as ``python -m benchmarks.web_app CONFIG PORT`` (uvicorn, as ``pbt-server web`` does).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from benchmarks.codeunits import NOOP
from pbt_server.config import load_config
from pbt_server.demo_ids import BLOCKED_BY_REASON, BLOCKED_CUSTOMERS, CUSTOMER_COUNT
from pbt_server.web import Access, create_app
from pbt_server.web.serve import serve

CUES = f"""<!doctype html><html><head><meta charset="utf-8"><title>Role Center</title>
<script src="/pbt/pbt.js"></script></head><body>
<div data-pbt-page="Business Manager Role Center">
<span data-pbt-cue="{BLOCKED_CUSTOMERS}" data-pbt-result="BlockedCustomers">-</span>
<span data-pbt-cue="{CUSTOMER_COUNT}" data-pbt-result="Customers">-</span>
<span data-pbt-cue="{BLOCKED_BY_REASON}" data-pbt-result="Ship">-</span>
<span data-pbt-cue="{BLOCKED_BY_REASON}" data-pbt-result="Invoice">-</span>
<span data-pbt-cue="{BLOCKED_BY_REASON}" data-pbt-result="All">-</span>
</div>
<script>
pbt.connect().then(() => (window.connectedAt = performance.timeOrigin + performance.now()));
new MutationObserver((changes, observer) => {{
  if (document.querySelectorAll('[data-pbt-state="done"]').length === 5) {{
    window.filledAt = performance.timeOrigin + performance.now();
    observer.disconnect();
  }}
}}).observe(document.body, {{subtree: true, attributes: true}});
</script></body></html>"""

TABS = """<!doctype html><html><head><meta charset="utf-8"><title>Tabs</title></head><body>
<script>
const n = Number(new URLSearchParams(location.search).get("n") || "1");
for (let i = 0; i < n; i++) {
  const frame = document.createElement("iframe");
  frame.src = "/cues";
  frame.width = 40;
  frame.height = 30;
  document.body.append(frame);
}
</script></body></html>"""

ROUND_TRIPS = """<!doctype html><html><head><meta charset="utf-8"><title>Round trips</title>
<script src="/pbt/pbt.js"></script>
<script>
async function roundTrips(n, codeunit) {
  const session = await pbt.connect();
  const page = await session.openPage("Round trips");
  let completed;
  page.onCompleted = () => completed();
  const times = [];
  for (let i = 0; i < n; i++) {
    const done = new Promise((resolve) => (completed = resolve));
    const started = performance.now();
    await page.enqueueBackgroundTask(codeunit, {});
    await done;
    times.push(performance.now() - started);
  }
  await page.close();
  return times;
}
async function echoTrips(n) {
  const ws = new WebSocket(new URL("/echo", location.href.replace(/^http/, "ws")));
  await new Promise((resolve) => (ws.onopen = resolve));
  const times = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    await new Promise((resolve) => {
      ws.onmessage = resolve;
      ws.send(JSON.stringify({op: "ping", rid: i}));
    });
    times.push(performance.now() - started);
  }
  ws.close();
  return times;
}
</script></head><body></body></html>"""

ALLOWED = frozenset({NOOP, BLOCKED_CUSTOMERS, CUSTOMER_COUNT, BLOCKED_BY_REASON})


def _authorize(request: HTTPConnection) -> Access:
    return Access(codeunits=ALLOWED)


def _page(html: str) -> Callable[[Request], Awaitable[HTMLResponse]]:
    body = html.encode()

    async def endpoint(request: Request) -> HTMLResponse:
        return HTMLResponse(body)

    return endpoint


async def _echo(socket: WebSocket) -> None:
    await socket.accept()
    try:
        while True:
            await socket.send_text(await socket.receive_text())
    except WebSocketDisconnect:
        pass


def create_bench_app(config_path: Path) -> Starlette:
    bridge = create_app(load_config(config_path), authorize=_authorize)
    app = Starlette(
        routes=[
            Route("/cues", _page(CUES)),
            Route("/tabs", _page(TABS)),
            Route("/rt", _page(ROUND_TRIPS)),
            WebSocketRoute("/echo", _echo),
            Mount("/pbt", bridge),
        ],
        lifespan=bridge.router.lifespan_context,
    )
    app.state.bridge = bridge.state.bridge
    return app


def main(argv: list[str]) -> int:
    config_path, port = Path(argv[0]), int(argv[1])
    config = load_config(config_path)
    serve(create_bench_app(config_path), host="127.0.0.1", port=port, config=config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
