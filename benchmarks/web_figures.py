"""Figures of the browser bridge: what a tab costs and how fast it is, measured for real.

Each function starts its own broker (``python -m pbt_server run --daemon``, 2 workers, the
codeunits of ``benchmarks.codeunits`` and ``workers.demo`` over a 5,000-customer demo
database) and web app (``python -m benchmarks.web_app``, uvicorn), measures, stops both and
returns plain numbers:

- :func:`round_trips`: a no-op task, enqueue -> ``onCompleted`` in Chromium, one after
  another, against the same through the asyncio client (enqueue -> ``on_completed``), and
  the floor: a bare WebSocket echo between the same Chromium and uvicorn.
- :func:`cue_fill`: from navigation start to all five cues of the Role Center filled, for
  1 tab and for ``n`` concurrent tabs (iframes of one page: each its own ``window.pbt``,
  WebSocket and session; one renderer instead of ``n``).
- :func:`idle_tab_memory`: RSS of the web app and of the broker per idle tab (a WebSocket
  that said hello: one session each), from bare WebSocket clients in this process.

``python -m benchmarks.web_figures [--quick]`` prints them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from benchmarks.codeunits import NOOP
from pbt_server.client import aio, connect
from pbt_server.demo import create_database
from pbt_server.errors import ConnectionLost

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
T = TypeVar("T")


@dataclass
class Stack:
    """A broker and the benchmark web app in front of it."""

    socket: str
    port: int
    broker: subprocess.Popen[bytes]
    web: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def stack(customers: int = 5000) -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="pbt-webbench-", dir="/tmp"))
    ini = directory / "server.ini"
    ini.write_text(
        f"[Server]\nSocketPath = {directory}/pbt.sock\nPidFile = {directory}/pbt.pid\n"
        f"LogFile = {directory}/pbt.log\nLogLevel = WARNING\n"
        "[Workers]\nCount = 2\n"
        f"[Database]\nUrl = sqlite:///{directory}/demo.db\n"
        "[Codeunits]\nModules = benchmarks.codeunits workers.demo\n"
    )
    create_database(directory / "demo.db", customers)
    port = _free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        broker = _spawn(["-m", "pbt_server", "run", "--daemon", "--config", str(ini)], started)
        _wait(lambda: _accepts(str(directory / "pbt.sock")), broker)
        web = _spawn(["-m", "benchmarks.web_app", str(ini), str(port)], started)
        _wait(lambda: _serves(f"http://127.0.0.1:{port}/cues"), web)
        yield Stack(str(directory / "pbt.sock"), port, broker, web)
    finally:
        for process in reversed(started):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A fresh headless Chromium (Debian's) through Playwright; yields a browser context."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context()
            yield context
            context.close()
        finally:
            browser.close()


# --- the figures --------------------------------------------------------------------------


def round_trips(n: int = 300, warmup: int = 30) -> dict[str, float]:
    """No-op round trip (enqueue -> completion trigger) in ms: browser vs asyncio client."""
    with stack(customers=10) as running, chromium() as context:
        page = context.new_page()
        page.goto(running.url + "/rt")
        browser = page.evaluate("([n, c]) => roundTrips(n, c)", [n + warmup, NOOP])[warmup:]
        echo = page.evaluate("(n) => echoTrips(n)", n + warmup)[warmup:]
        python = _in_thread(_python_round_trips(running.socket, n + warmup))[warmup:]
        page.close()
    return {
        "n": n,
        "browser_p50_ms": _percentile(browser, 50),
        "browser_p99_ms": _percentile(browser, 99),
        "python_p50_ms": _percentile(python, 50),
        "python_p99_ms": _percentile(python, 99),
        "browser_ws_echo_p50_ms": _percentile(echo, 50),
        "browser_ws_echo_p99_ms": _percentile(echo, 99),
    }


def cue_fill(tabs: int = 1) -> dict[str, float]:
    """Navigation start -> every cue of the Role Center filled, in ms, for ``tabs`` tabs.

    Also the median of its two parts: navigation -> session connected (page and script
    loaded, WebSocket opened: the browser's share), and connected -> filled (open the page,
    enqueue three tasks, run them, deliver five results: the bridge's and the broker's).
    """
    with stack() as running, chromium() as context:
        page = context.new_page()
        if tabs == 1:
            page.goto(running.url + "/cues")
            tabs_js = "[window]"
        else:
            page.goto(f"{running.url}/tabs?n={tabs}")
            tabs_js = "[...document.querySelectorAll('iframe')].map((f) => f.contentWindow)"
        page.wait_for_function(
            f"{tabs_js}.length === {tabs} && {tabs_js}.every((w) => w.filledAt !== undefined)",
            timeout=180_000,
            polling=50,
        )
        times = f"{tabs_js}.map((w) => [w.performance.timeOrigin, w.connectedAt, w.filledAt])"
        top, frames = page.evaluate(f"[performance.timeOrigin, {times}]")
        page.close()
    return {
        "tabs": tabs,
        "all_filled_ms": max(filled for _, _, filled in frames) - top,
        "median_tab_ms": statistics.median(filled - origin for origin, _, filled in frames),
        "median_connect_ms": statistics.median(conn - origin for origin, conn, _ in frames),
        "median_connected_to_filled_ms": statistics.median(f - c for _, c, f in frames),
    }


def idle_tab_memory(tabs: int = 1000, warmup: int = 20) -> dict[str, float]:
    """KiB of RSS per idle tab in the web app and in the broker."""
    with stack(customers=10) as running:
        web = psutil.Process(running.web.pid)
        broker = psutil.Process(running.broker.pid)
        result: dict[str, float] = _in_thread(_idle_tabs(running, web, broker, tabs, warmup))
    return result


# --- helpers ------------------------------------------------------------------------------


async def _python_round_trips(address: str, n: int) -> list[float]:
    async with await aio.connect(address) as session:
        page = await session.open_page("Round trips")
        done = asyncio.Event()
        page.on_completed = lambda task_id, results: done.set()
        times = []
        for _ in range(n):
            done.clear()
            started = time.perf_counter()
            await page.enqueue_background_task(NOOP)
            await done.wait()
            times.append((time.perf_counter() - started) * 1000)
        return times


async def _idle_tabs(
    running: Stack, web: psutil.Process, broker: psutil.Process, tabs: int, warmup: int
) -> dict[str, float]:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.typing import Origin

    url = f"ws://127.0.0.1:{running.port}/pbt/ws"

    async def tab() -> Any:
        socket = await ws_connect(url, origin=Origin(running.url), proxy=None, compression=None)
        await socket.send(json.dumps({"op": "hello", "protocol": 1}))
        assert json.loads(await socket.recv())["op"] == "welcome"
        return socket

    first = [await tab() for _ in range(warmup)]
    await asyncio.sleep(0.5)
    web_before, broker_before = web.memory_info().rss, broker.memory_info().rss
    sockets = []
    for _ in range(tabs // 50):
        sockets += await asyncio.gather(*(tab() for _ in range(50)))
    await asyncio.sleep(0.5)
    web_after, broker_after = web.memory_info().rss, broker.memory_info().rss
    for each in first + sockets:
        await each.close()
    return {
        "tabs": len(sockets),
        "bridge_kib_per_tab": (web_after - web_before) / len(sockets) / 1024,
        "broker_kib_per_tab": (broker_after - broker_before) / len(sockets) / 1024,
    }


def _percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


def _in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a thread of its own: Playwright's sync API holds this thread's loop."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(coroutine)))
    thread.start()
    thread.join()
    value, error = outcome[0]
    if error is not None:
        raise error
    result: T = value
    return result


def _capture(coroutine: Coroutine[Any, Any, T]) -> tuple[T | None, BaseException | None]:
    try:
        return asyncio.run(coroutine), None
    except BaseException as exc:
        return None, exc


def _spawn(arguments: list[str], started: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, *arguments],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started.append(process)
    return process


def _wait(ready: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.args!r} did not come up")
        time.sleep(0.05)


def _accepts(address: str) -> bool:
    try:
        connect(address, timeout=1).close()
    except ConnectionLost:
        return False
    return True


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = parser.parse_args(argv)
    quick = args.quick
    figures = {
        "round_trips": round_trips(n=30 if quick else 300),
        "cue_fill_1": cue_fill(1),
        "cue_fill_n": cue_fill(20 if quick else 200),
        "idle_tab_memory": idle_tab_memory(100 if quick else 1000),
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
