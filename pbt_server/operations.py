"""The operations endpoint on ``[Server] MetricsAddress``: metrics, health and the dashboard.

::

    broker's event loop                          HTTP threads (this module)
    ───────────────────                          ──────────────────────────────────────────
    Broker._send ──task_ended──▶ Telemetry       GET /metrics     ─┐ 1. snapshot on the loop:
    WorkerPool ──worker_ended──▶  (counts)       GET /health       ├─   call_soon_threadsafe,
                                                 GET /api/status  ─┘    wait <= SNAPSHOT_TIMEOUT
    _snapshot(): copy the counts, sum the  ◀────                     2. here: RSS from /proc,
    sessions, list the worker slots                                     Prometheus text, JSON
                                                 GET /, /dashboard.{js,css}: the dashboard

The loop does one short callback per request (no ``/proc`` reads, no formatting); a loop
that does not run it within :data:`SNAPSHOT_TIMEOUT` makes ``/health`` answer 503 and
``/metrics`` fail, instead of either hanging. A plain ``http.server`` in a thread of its
own: no dependency beyond prometheus-client, and nothing of it runs on the loop.

- ``/metrics``: Prometheus text, or OpenMetrics when the scraper's ``Accept`` asks for it;
  the families are listed in ``metrics.py``;
- ``/health``: ``200 ok`` when the loop answers, every worker slot holds a worker and the
  server is not stopping, else ``503`` and the reason (HAProxy: ``option httpchk GET
  /health``); ``HEAD`` works too;
- ``/``: the live dashboard; ``/api/status``: its JSON (``pbt_server.dashboard``).

No authentication (like Prometheus exporters): bind it to an address only operators and
scrapers reach.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import psutil

from pbt_server import __version__, dashboard
from pbt_server.metrics import Snapshot, exposition
from pbt_server.report import health_problem, live_state
from pbt_server.telemetry import Telemetry

if TYPE_CHECKING:
    from pbt_server.config import ServerConfig
    from pbt_server.pool import WorkerPool
    from pbt_server.server import Listeners
    from pbt_server.sessions import Scheduler

SNAPSHOT_TIMEOUT: Final = 1.0  # seconds the loop has to answer a request's snapshot
MAX_REQUESTS: Final = 16  # requests served at once; more are turned away (503)
REQUEST_TIMEOUT: Final = 10.0  # a client that sends its request slower than this is cut off

log = logging.getLogger(__name__)
T = TypeVar("T")


class Observed(Protocol):
    """What the endpoint reads of the broker, always on the broker's loop."""

    config: ServerConfig
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    pool: WorkerPool
    stopping: bool
    started: float
    max_sessions: int
    listeners: Listeners


class LoopUnavailable(Exception):
    """The broker's loop did not take or run the snapshot in time (wedged, or closed)."""


class OperationsServer:
    """The HTTP endpoint on ``MetricsAddress`` and the :class:`Telemetry` it shows."""

    def __init__(self, broker: Observed, address: tuple[str, int]) -> None:
        """Bind the address now (before the broker forks a worker or opens its socket, so
        an address in use fails the start cleanly); :meth:`start` serves it.

        Raises:
            OSError: the address cannot be bound (the message names MetricsAddress).
        """
        self.broker = broker
        self.telemetry = Telemetry(broker.loop.time)
        self._thread: threading.Thread | None = None
        self._processes: dict[int, psutil.Process] = {}
        self._processes_lock = threading.Lock()
        self._me = psutil.Process()
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # Workers do not inherit the socket: their prologue closes every socket the
            # broker opened after importing the codeunits.
            self._httpd = _HTTPServer((host, port), _Handler, family, self)
        except OSError as err:
            raise OSError(
                err.errno, f"[Server] MetricsAddress {host}:{port}: {err.strerror or err}"
            ) from err

    @property
    def address_text(self) -> str:
        """``host:port`` as bound (the port the OS chose for port 0)."""
        host, port = self._httpd.server_address[:2]
        return f"[{host!s}]:{port}" if ":" in str(host) else f"{host!s}:{port}"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Serve in a thread of its own (connections made before wait in the backlog)."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="pbt-metrics"
        )
        self._thread.start()
        log.info("metrics, health and dashboard on http://%s/", self.address_text)

    def close(self) -> None:
        """Stop serving (blocks up to the poll interval: call it off the loop)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # --- snapshots: taken on the loop ---------------------------------------------------

    def on_loop(self, work: Callable[[], T], timeout: float = SNAPSHOT_TIMEOUT) -> T:
        """Run ``work`` on the broker's loop and return its result (from an HTTP thread)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():  # skipped if the caller gave up
                try:
                    future.set_result(work())
                except BaseException as err:
                    future.set_exception(err)

        try:
            self.broker.loop.call_soon_threadsafe(run)
        except RuntimeError as err:  # the loop is closed: the broker is gone
            raise LoopUnavailable("the broker's event loop has stopped") from err
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise LoopUnavailable(
                f"the broker's event loop did not answer within {timeout:g} s"
            ) from None

    def snapshot(self, *, history: bool) -> Snapshot:
        def take() -> Snapshot:
            broker = self.broker
            sessions = broker.scheduler.sessions.values()
            shown = dashboard.SESSIONS_SHOWN if history else 0
            return Snapshot(
                counters=self.telemetry.snapshot(history=history),
                state=live_state(sessions, broker.pool, broker.loop.time(), busiest=shown),
                max_sessions=broker.max_sessions,
                stopping=broker.stopping,
            )

        return self.on_loop(take)

    # --- what the routes answer (HTTP threads) ------------------------------------------

    def health(self) -> str | None:
        """Why the broker is unhealthy, or None."""
        try:
            snap = self.snapshot(history=False)
        except LoopUnavailable as err:
            return str(err)
        if snap.stopping:
            return "the server is stopping"
        return health_problem(snap.state)

    def metrics(self, accept: str) -> tuple[bytes, str]:
        snap = self.snapshot(history=False)
        rss = self._read_rss(snap.state["workers"])
        return exposition(snap, rss, self._broker_rss(), accept)

    def api_status(self) -> dict[str, Any]:
        snap = self.snapshot(history=True)
        self._read_rss(snap.state["workers"])
        problem = "the server is stopping" if snap.stopping else health_problem(snap.state)
        broker = self.broker
        server = {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.monotonic() - broker.started, 3),
            "socket": str(broker.config.server.socket_path),
            "tcp": broker.listeners.tcp_text() or None,
            "metrics": self.address_text,
            "max_sessions": snap.max_sessions,
        }
        return dashboard.dashboard_state(
            snap.counters, snap.state, server, broker_rss=self._broker_rss(), healthy=problem
        )

    def _broker_rss(self) -> int:
        try:
            return int(self._me.memory_info().rss)
        except psutil.Error:
            return 0

    def _read_rss(self, workers: Collection[dict[str, Any]]) -> dict[str, int]:
        """Fill each worker row's ``rss`` (from /proc, here, not on the loop); by slot."""
        by_slot: dict[str, int] = {}
        with self._processes_lock:
            live = {w["pid"] for w in workers if w["pid"]}
            for pid in set(self._processes) - live:
                del self._processes[pid]
            for w in workers:
                pid = w["pid"]
                if pid and w["state"] != "booting":
                    w["rss"] = self._rss_of(pid)
                by_slot[str(w["slot"])] = w["rss"]
        return by_slot

    def _rss_of(self, pid: int) -> int:
        try:
            process = self._processes.get(pid)
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
            return int(process.memory_info().rss)
        except psutil.Error:
            return 0


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not hold the broker's exit

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        family: socket.AddressFamily,
        operations: OperationsServer,
    ) -> None:
        self.address_family = family
        self.operations = operations
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN: DNS, on the broker's loop.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= MAX_REQUESTS
            if not full:
                self._active += 1
        if full:
            # No thread for it: a flood of scrapes must not become a flood of threads.
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT
    server_version = f"pbt-server/{__version__}"

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, *, body: bool) -> None:
        operations = self.server.operations
        path = self.path.partition("?")[0]
        try:
            if path == "/health":
                problem = operations.health()
                text = "ok\n" if problem is None else f"unhealthy: {problem}\n"
                self._send(200 if problem is None else 503, text.encode(), "text/plain", body)
            elif path == "/metrics":
                data, content_type = operations.metrics(self.headers.get("Accept", ""))
                self._send(200, data, content_type, body)
            elif path == "/api/status":
                data = json.dumps(operations.api_status()).encode()
                self._send(200, data, "application/json", body)
            elif path in dashboard.FILES:
                data, content_type = dashboard.read_file(dashboard.FILES[path])
                self._send(200, data, content_type, body)
            else:
                self._send(404, b"not found\n", "text/plain", body)
        except LoopUnavailable as err:
            self._send(503, f"{err}\n".encode(), "text/plain", body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except Exception:
            log.exception("operations endpoint: %s failed", path)
            self._send(500, b"internal error\n", "text/plain", body)

    def _send(self, status: int, data: bytes, content_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per health check (every second, from each balancer) is noise

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("operations endpoint: " + format, *args)
