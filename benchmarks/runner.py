"""The run: ``for run in range(N): for figure: for system (order rotated per run): measure``,
so drift (thermal, noisy neighbours) hits every system alike.

Each measurement runs in a cell (a fresh forked process of its own group); brokers are
started on demand, one per distinct settings, and stopped at the end (also on an error).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.broker import BrokerProcess, merge
from benchmarks.cells import Cells, ForeignLoad
from benchmarks.figure import Figure, Measurement, Settings
from benchmarks.timing import BenchError, Metrics


@dataclass
class Outcome:
    """Per figure, per system: one metrics map per run (None where the measurement failed)."""

    runs: int
    data: dict[str, dict[str, list[Metrics | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, figure: str, system: str, run: int, metrics: Metrics | None) -> None:
        slots = self.data.setdefault(figure, {}).setdefault(system, [None] * self.runs)
        slots[run] = metrics


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(metrics: Metrics) -> str:
    shown = []
    for key, value in metrics.items():
        if isinstance(value, float) and key != "foreign_cores":
            shown.append(f"{key}={value:,.3g}" if abs(value) < 1000 else f"{key}={value:,.0f}")
    return " ".join(shown[:6])


class Bench:
    def __init__(self, figures: Sequence[tuple[Figure[Any], Any]], runs: int) -> None:
        self.figures = figures  # (figure, its params)
        self.runs = runs
        self.root = Path(tempfile.mkdtemp(prefix="pbt-bench-", dir="/tmp"))
        self.brokers: dict[str, BrokerProcess] = {}  # by settings
        self.cells = Cells()

    def broker(self, name: str, settings: Settings) -> BrokerProcess:
        """The shared broker with ``settings`` (started, or restarted if it died)."""
        key = json.dumps(settings, sort_keys=True)
        broker = self.brokers.get(key)
        if broker is None or broker.process.poll() is not None:
            if broker is not None:
                broker.stop()
            broker = self.brokers[key] = BrokerProcess.start(name, settings, self.root)
        return broker

    def run(self) -> Outcome:
        outcome = Outcome(self.runs)
        for run in range(self.runs):
            for figure, params in self.figures:
                measurements = list(figure.plan(params))
                shift = run % len(measurements)  # rotate: no system is always first
                for m in measurements[shift:] + measurements[:shift]:
                    metrics = self.measure(figure, m, run, outcome)
                    outcome.add(figure.name, m.system, run, metrics)
        return outcome

    def measure(
        self, figure: Figure[Any], m: Measurement, run: int, outcome: Outcome
    ) -> Metrics | None:
        kwargs = dict(m.kwargs)
        fresh: BrokerProcess | None = None
        started = time.monotonic()
        load = ForeignLoad(lambda: [b.pid for b in self.brokers.values()])
        try:
            if m.broker:
                settings = merge(figure.broker, m.settings)
                if m.fresh_broker:
                    fresh = BrokerProcess.start(figure.name, settings, self.root)
                    broker = fresh
                    pid = fresh.pid
                    load = ForeignLoad(lambda: [pid, *(b.pid for b in self.brokers.values())])
                else:
                    broker = self.broker(figure.name, settings)
                kwargs["socket_path"] = broker.socket
                if m.broker_pid:
                    kwargs["broker_pid"] = broker.pid
                if m.broker_log:
                    kwargs["broker_log"] = broker.log
            metrics = self.cells.run(m.function, kwargs, m.limit)
            metrics["foreign_cores"] = load.cores()
        except BenchError as err:
            text = f"run {run + 1}, {figure.name}, {m.system}: {err}"
            outcome.errors.append(text)
            progress(f"ERROR {text}")
            return None
        finally:
            if fresh is not None:
                fresh.stop()
        progress(
            f"[run {run + 1}/{self.runs}] {figure.name:<10} {m.system:<16} "
            f"{_brief(metrics)}  ({time.monotonic() - started:.1f} s, "
            f"others {metrics['foreign_cores']:.2f} cores)"
        )
        return metrics

    def cleanup(self) -> None:
        self.cells.kill_all()
        for broker in self.brokers.values():
            broker.stop()
        self.brokers.clear()
        shutil.rmtree(self.root, ignore_errors=True)
