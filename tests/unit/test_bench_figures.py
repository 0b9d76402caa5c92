"""The benchmark's records and report, without measuring anything: every figure is complete,
targets are computed run by run, and the markdown shows what the records say."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import pytest

from benchmarks.figure import Limit, Ratio, Runs, Table
from benchmarks.figures import FIGURES
from benchmarks.load import Call, Timed, at_once
from benchmarks.report import evaluate_targets, render_markdown, summarize, targets_text
from benchmarks.timing import time_calls


@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.name)
def test_every_figure_is_a_complete_record(figure) -> None:
    for params in (figure.params, figure.quick):
        plan = figure.plan(params)
        systems = [m.system for m in plan]
        assert plan, "a figure measures something"
        assert len(set(systems)) == len(systems), f"systems must be unique: {systems}"
        assert all(m.label for m in plan)
        assert figure.tables(params)
        for rule in figure.targets(params):  # a target on a system never measured is silent
            named = [rule.ours, rule.theirs] if isinstance(rule, Ratio) else [rule.system]
            assert set(named) <= set(systems), (rule.name, systems)
    assert len({f.name for f in FIGURES}) == len(FIGURES)


def test_issue_12_targets_are_all_declared() -> None:
    names = [rule.name for figure in FIGURES for rule in figure.targets(figure.params)]
    for needle in (
        "(sync client) ≤ 0.5x",
        "(asyncio client) ≤ 0.6x",
        "throughput, 50 sessions ≥ 2x",
        "throughput, 1 session ≥ 1.2x pebble",
        "kill + replace p99 ≤ 5 ms",
        "cancel storm",
        "timeout error p99 ≤ deadline + 20 ms",
        "cancel → slot free p50 ≤ 5 ms",
        "enqueue cost at 100,000 waiting ≤ 1.5x at 10",
    ):
        assert any(needle in name for name in names), needle


def test_issue_13_and_14_figures_are_all_declared() -> None:
    names = [rule.name for figure in FIGURES for rule in figure.targets(figure.params)]
    for needle in (
        "metrics on: no-op round trip p50 ≤ 1.03x off",
        "metrics on: throughput ≥ 0.97x off",
        "timeout error p99 ≤ deadline + 20 ms, the stuck code's stack in the error",
        "timeout error p99 ≤ deadline + 20 ms, a worker that cannot give its stack",
        "role center, shared=True: executions run vs plain",
        "role center, shared=True: every cue filled vs plain",
        "cache hit round trip p50 < 1x a no-op's",
        "shared=True on a miss: round trip p50 ≤ 1.05x a no-op's",
    ):
        assert needle in names, needle
    role_center = next(f for f in FIGURES if f.name == "rolecenter")
    assert role_center.params.sessions == 200


def test_a_ratio_without_a_limit_is_reported_not_judged() -> None:
    runs: Runs = {"shared": [{"executions": 8.0}], "plain": [{"executions": 800.0}]}
    result = Ratio("executions vs plain", "shared", "plain", "executions", None).evaluate(runs)
    assert result is not None
    assert result.measured.median == pytest.approx(0.01)
    assert result.met is None
    assert result.status == "reported"
    assert targets_text([result]).startswith("reported executions vs plain: 0.01 x (no target)")


def test_a_ratio_is_taken_run_by_run_then_the_median() -> None:
    runs: Runs = {
        "ours": [{"p50_us": 100.0}, {"p50_us": 300.0}, None],
        "theirs": [{"p50_us": 200.0}, {"p50_us": 400.0}, {"p50_us": 1.0}],
    }
    result = Ratio("r", "ours", "theirs", "p50_us", 0.6, unit="µs").evaluate(runs)
    assert result is not None
    assert result.measured.median == pytest.approx((0.5 + 0.75) / 2)
    assert (result.measured.low, result.measured.high) == (0.5, 0.75)
    assert result.met is False  # 0.625 > 0.6
    assert result.detail == "200 vs 200 µs"
    assert Ratio("r", "ours", "nobody", "p50_us", 1.0).evaluate(runs) is None


def test_a_lower_bound_and_an_absolute_limit() -> None:
    runs: Runs = {"pbt": [{"tasks_per_s": 9000.0, "p99_ms": 4.0}], "ppe": [{"tasks_per_s": 4000.0}]}
    ratio = Ratio("t", "pbt", "ppe", "tasks_per_s", 2.0, upper=False).evaluate(runs)
    assert ratio is not None
    assert ratio.met
    limit = Limit("k", "pbt", "p99_ms", 5.0, "ms").evaluate(runs)
    assert limit is not None
    assert limit.met


def test_the_markdown_shows_labels_targets_and_custom_tables() -> None:
    storm = next(f for f in FIGURES if f.name == "storm")
    scale = next(f for f in FIGURES if f.name == "scale")
    data = {
        "storm": {
            "pbt": [{"p50_ms": 90.0, "p99_ms": 120.0, "kills": 40}],
            "ppe-drop": [{"p50_ms": 100.0, "p99_ms": 200.0, "queries_run": 60}],
        },
        "scale": {"pbt": [{"batch_us@10": 40.0, "batch_us@100000": 80.0, "waiting_at_close": 5.0}]},
    }
    figures = [(storm, storm.params), (scale, scale.params)]
    targets = evaluate_targets(figures, data)
    report = _report(data, targets)
    text = render_markdown(report, figures)
    assert "| cancel storm: last set_record → result p50 ≤ 1.0x" in text
    assert "| **met** |" in text  # 0.9x
    assert "| enqueue cost at 100,000 waiting ≤ 1.5x at 10 |" in text
    assert "| **MISSED** |" in text  # 2.0x
    assert "| pbt-server (set_record cancels; a running task's worker is killed) | 90.0" in text
    assert "| 100,000 | 80.0 (80.0-80.0) |" in text  # the scale figure's own table
    assert "Quick (smoke test)" in text


def test_the_role_center_table_and_its_reported_ratios() -> None:
    figure = next(f for f in FIGURES if f.name == "rolecenter")
    data = {
        "rolecenter": {
            "plain": [{"executions": 800.0, "all_filled_ms": 8000.0}],
            "shared": [{"executions": 8.0, "attaches": 792.0, "all_filled_ms": 100.0}],
        }
    }
    figures = [(figure, figure.params)]
    targets = evaluate_targets(figures, data)
    text = render_markdown(_report(data, targets), figures)
    assert "| role center, shared=True: executions run vs plain | 0.01 (0.01-0.01) x" in text
    assert "| 8.00 vs 800; 200 sessions x 4 cues | reported |" in text
    assert "| pbt-server, shared=True (identical cues attach to one execution) | 8.00" in text


def test_at_once_starts_every_client_after_all_are_prepared() -> None:
    async def prepare(address: str, share: int) -> tuple[Timed, Call]:
        prepared = time.monotonic()

        async def timed() -> tuple[str, int, float]:
            return address, share, prepared

        async def after() -> None:
            return None

        return timed, after

    spans = at_once(prepare, "nowhere", [1, 2, 3], limit=60)
    assert [value[:2] for _, _, value in spans] == [("nowhere", 1), ("nowhere", 2), ("nowhere", 3)]
    last_prepared = max(value[2] for _, _, value in spans)
    assert all(start >= last_prepared for start, _, _ in spans)
    assert all(end >= start for start, end, _ in spans)


def test_time_calls_warms_up_and_runs_before_untimed() -> None:
    calls: list[str] = []
    samples = time_calls(lambda: calls.append("call"), 3, 2, lambda: calls.append("before"))
    assert len(samples) == 3
    assert calls == ["before", "call"] * 5


def test_a_table_without_columns_renders_itself() -> None:
    table = Table("t", render=lambda summary: [f"{len(summary)} systems"])
    assert table.render is not None
    assert table.render({"a": {}}) == ["1 systems"]


def _report(data: dict[str, Any], targets: list[Any]) -> dict[str, Any]:
    """A report as the CLI makes it, around ``data`` and its evaluated targets."""
    return {
        "started": "now",
        "runs": 1,
        "quick": True,
        "machine": {
            key: "x"
            for key in ("cpu", "usable_cpus", "logical_cpus", "physical_cores", "memory_gb")
        }
        | {key: "x" for key in ("os", "python", "pbt_server", "commit", "msgpack", "pebble")}
        | {"psutil": "x", "loadavg": [0.0, 0.0, 0.0]},
        "loadavg_end": [0.0, 0.0, 0.0],
        "seconds": 1.0,
        "command": "bench",
        "results": data,
        "summary": summarize(data),
        "targets": [asdict(t) | {"met": t.met} for t in targets],
        "errors": [],
    }
