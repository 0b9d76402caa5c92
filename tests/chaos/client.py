"""A chaos client process: ``python -m tests.chaos.client SPEC_JSON``.

Runs episodes on ``sessions`` lanes (asyncio, or blocking threads) until its share of the
tasks is accepted (a victim runs until the harness kills it), then writes its counts,
violations and what the harness checks across clients (the shared tasks' records, the
latest enqueue per code generation) as JSON to ``spec["result"]``; every two seconds it
writes how many tasks it got accepted to the ``.progress`` file beside it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.chaos.episodes import run_aio_lanes, run_blocking_lanes
from tests.chaos.ledger import Ledger
from tests.chaos.tamper import relay
from tests.chaos_codeunits import CHAOS, CHAOS_VICTIM


class ClientState:
    """One client process: its seed, budget and totals (shared by its lanes)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.index: int = spec["index"]
        self.seed: int = spec["seed"]
        self.socket: str = spec["socket"]
        self.pids: str = spec["pids"]
        self.victim: bool = spec["victim"]
        self.remaining: int = spec["tasks"]
        self.budget: int = spec["tasks"]
        self.lanes: int = spec["sessions"]
        self.stall_timeout: float = spec["stall_timeout"]
        self.codeunit = CHAOS_VICTIM if self.victim else CHAOS
        self.counts: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.shared: list[dict[str, Any]] = []
        self.latest_gen: dict[str, tuple[float, str]] = {}
        self.lock = threading.Lock()
        self.episodes = 0

    def claim(self, rng: random.Random) -> tuple[int, int]:
        """An episode number and how many tasks it should get accepted (0: none left)."""
        with self.lock:
            self.episodes += 1
            longest = max(60, min(1500, self.budget // (4 * self.lanes)))
            want = rng.choice((rng.randint(5, 60), rng.randint(30, longest), longest))
            claim = want if self.victim else min(want, self.remaining)
            self.remaining -= claim
            return self.episodes, claim

    def absorb(self, ledger: Ledger) -> None:
        """Take an ended episode's counts and violations."""
        with self.lock:
            self.counts.update(ledger.counts)
            self.violations += ledger.violations
            self.shared += ledger.shared_records()
            for gen, latest in ledger.latest_gen.items():
                if latest[0] > self.latest_gen.get(gen, (-1.0, ""))[0]:
                    self.latest_gen[gen] = latest


@contextlib.contextmanager
def _progress_reports(client: ClientState, path: Path) -> Iterator[None]:
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(2.0):
            path.write_text(str(client.counts["accepted"]))

    reporter = threading.Thread(target=report, name="chaos-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()


def _run(client: ClientState, spec: Mapping[str, Any]) -> None:
    if spec["flavour"] == "sync":
        run_blocking_lanes(client, spec["sessions"])
    else:
        asyncio.run(run_aio_lanes(client, spec["sessions"]))


def client_main(spec: Mapping[str, Any]) -> int:
    """Run the episodes, then write counts, violations and any crash as JSON."""
    client = ClientState(spec)
    result = Path(spec["result"])
    crashed = ""
    with _progress_reports(client, result.with_suffix(".progress")):
        try:
            if spec.get("inject"):
                with relay(client.socket, spec["inject"]) as tampering:
                    client.socket = tampering.path
                    try:
                        _run(client, spec)
                    finally:
                        client.counts.update(tampering.tamper.counts)
            else:
                _run(client, spec)
        except BaseException as err:  # report it: the harness turns it into a violation
            crashed = "".join(traceback.format_exception(err))
    text = json.dumps(
        {
            "counts": dict(client.counts),
            "violations": client.violations,
            "crashed": crashed,
            "shared": client.shared,
            "latest_gen": client.latest_gen,
        }
    )
    result.with_suffix(".tmp").write_text(text)
    result.with_suffix(".tmp").rename(result)
    return 0


if __name__ == "__main__":
    sys.exit(client_main(json.loads(sys.argv[1])))
