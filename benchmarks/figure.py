"""What a figure is: one record that says what to measure, how to show it, what to aim for.

A :class:`Figure` names its counts (``params`` for a full run, ``quick`` for a smoke test),
the broker settings its pbt-server measurements run against, a ``plan`` that turns the
counts into :class:`Measurement` s (one per system: pbt-server, each baseline, each floor),
the tables of the report, and the targets it checks. The runner, the report and the CLI
know nothing about any figure in particular.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from benchmarks.timing import Metrics, Spread

P = TypeVar("P")
Settings = Mapping[str, Mapping[str, str]]
# Per system, one metrics map per run (None where that run's measurement failed).
Runs = Mapping[str, Sequence[Metrics | None]]
# Per system, per metric: the spread over runs, as {"median", "low", "high"}.
Summary = Mapping[str, Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class Measurement:
    """One system's measurement: ``function(**kwargs)`` in a fresh process, returning metrics.

    With ``broker``, the function also gets ``socket_path`` of a broker with the figure's
    settings plus the measurement's own ``settings`` (one broker per distinct settings,
    shared; with ``fresh_broker``, one started for this measurement alone), and where asked
    its ``broker_pid`` and ``broker_log`` (the broker's log file). Two systems of one figure
    may so compare two configurations (e.g. a feature on and off).
    """

    system: str  # its key in the results
    label: str  # its row in the tables
    function: Callable[..., Metrics]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    broker: bool = False
    settings: Settings = field(default_factory=dict)  # on top of the figure's broker settings
    fresh_broker: bool = False
    broker_pid: bool = False
    broker_log: bool = False
    limit: float = 300.0  # seconds before the measurement counts as failed


@dataclass(frozen=True)
class Table:
    """A table with one row per system and one column per metric ``(key, header)``; or, with
    ``render``, any markdown lines made from the figure's summary."""

    title: str
    columns: Sequence[tuple[str, str]] = ()
    render: Callable[[Summary], list[str]] | None = None


@dataclass(frozen=True)
class TargetResult:
    name: str
    measured: Spread
    unit: str
    limit: float | None  # None: reported, with no target to meet
    upper: bool  # True: measured must be <= limit; False: >= limit
    detail: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the median meets the limit; None when there is no limit."""
        if self.limit is None:
            return None
        m = self.measured.median
        return m <= self.limit if self.upper else m >= self.limit

    @property
    def status(self) -> str:
        return {True: "met", False: "MISSED", None: "reported"}[self.met]


def per_run(runs: Runs, system: str, key: str) -> list[float | None]:
    return [m.get(key) if m else None for m in runs.get(system, [])]


def num(value: float) -> str:
    """A figure as the report prints it: three significant digits, thousands separated."""
    if value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass(frozen=True)
class Ratio:
    """Target: ``ours.key / theirs.theirs_key``, run by run (the same run's baseline), then
    the median over runs, against ``limit`` (None: the ratio is reported, not judged)."""

    name: str
    ours: str
    theirs: str
    key: str
    limit: float | None
    upper: bool = True
    unit: str = ""  # of the key, for the detail column
    theirs_key: str = ""  # default: key
    detail: str = ""

    def evaluate(self, runs: Runs) -> TargetResult | None:
        a = per_run(runs, self.ours, self.key)
        b = per_run(runs, self.theirs, self.theirs_key or self.key)
        spread = Spread.of([x / y for x, y in zip(a, b, strict=False) if x is not None and y])
        if spread is None:
            return None
        ours = Spread.of([x for x in a if x is not None])
        theirs = Spread.of([y for y in b if y is not None])
        assert ours is not None
        assert theirs is not None
        basis = f"{num(ours.median)} vs {num(theirs.median)} {self.unit}".rstrip()
        detail = f"{basis}; {self.detail}" if self.detail else basis
        return TargetResult(self.name, spread, "x", self.limit, self.upper, detail)


@dataclass(frozen=True)
class Limit:
    """Target: ``system.key`` (median over runs) against an absolute ``limit``."""

    name: str
    system: str
    key: str
    limit: float
    unit: str
    upper: bool = True
    detail: str = ""

    def evaluate(self, runs: Runs) -> TargetResult | None:
        spread = Spread.of([v for v in per_run(runs, self.system, self.key) if v is not None])
        if spread is None:
            return None
        return TargetResult(self.name, spread, self.unit, self.limit, self.upper, self.detail)


Rule = Ratio | Limit


def _no_targets(params: Any) -> Sequence[Rule]:
    return ()


@dataclass(frozen=True)
class Figure(Generic[P]):
    """Everything about one figure. See benchmarks/README.md, "Adding a figure"."""

    name: str  # for --only, and its key in the results
    about: str  # one line: what it measures
    params: P  # counts for a full run (a frozen dataclass)
    quick: P  # counts for --quick
    plan: Callable[[P], Sequence[Measurement]]
    tables: Callable[[P], Sequence[Table]]
    targets: Callable[[P], Sequence[Rule]] = _no_targets
    broker: Settings = field(default_factory=dict)  # on top of the broker's base settings
