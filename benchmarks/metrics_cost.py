"""What ``[Server] MetricsAddress`` costs: the no-op round trip and throughput of a broker
with it, against one without, optionally while a scraper reads ``/metrics`` and the
dashboard's ``/api/status`` (from a process of its own, so its CPU is not the client's)."""

from __future__ import annotations

import time
import urllib.request

from benchmarks import pbt
from benchmarks.cells import FORK, die_with_parent
from benchmarks.timing import BenchError, Metrics
from pbt_server.client import connect


def _scrape(address: str, every: float) -> None:
    die_with_parent()
    while True:
        for path in ("/metrics", "/api/status"):
            with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
                response.read()
        time.sleep(every)


def metrics_cost(
    socket_path: str, n: int, warmup: int, sessions: int, total: int, scrape_every: float
) -> Metrics:
    """The sync client's no-op round trip, then no-op tasks/s over ``sessions`` clients."""
    with connect(socket_path) as session:
        server = session.status()["server"]
    address = server.get("metrics") if isinstance(server, dict) else None
    if scrape_every and not address:
        raise BenchError("the broker serves no metrics: MetricsAddress is not set")
    scraper = None
    if scrape_every:
        scraper = FORK.Process(target=_scrape, args=(address, scrape_every), daemon=True)
        scraper.start()
    try:
        metrics = pbt.latency_pbt_sync(socket_path, n, warmup)
        metrics |= pbt.throughput_pbt(socket_path, sessions, total)
        if scraper is not None and not scraper.is_alive():
            raise BenchError("the scraper failed (see its traceback above)")
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.join()
    return metrics
