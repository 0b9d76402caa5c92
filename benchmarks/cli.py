"""``scripts/bench.py``: parse the command line, run the chosen figures, print and write."""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.figure import Figure
from benchmarks.figures import FIGURES
from benchmarks.report import (
    REPO,
    command,
    evaluate_targets,
    machine_info,
    render_markdown,
    summarize,
    targets_text,
    write_outputs,
)
from benchmarks.runner import Bench, progress

FD_LIMIT = 8192  # brokers inherit it: 1,000 sessions need 1,000+ descriptors on both ends


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _on_terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = [f.name for f in FIGURES]
    parser = argparse.ArgumentParser(
        description="Benchmark pbt-server against ProcessPoolExecutor, pebble, "
        "multiprocessing.Pool and two transport floors, interleaved, in one run.",
        epilog="figures: " + "; ".join(f"{f.name}: {f.about}" for f in FIGURES),
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 5; --quick: 1)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, for a smoke test (prints only)"
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", help=f"figures to run, of: {', '.join(names)}"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="write DIR/results/<date>.json and DIR/README.md (default: benchmarks/ for a "
        "full run; --quick and --only runs only print unless --out is given)",
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    chosen = names
    if args.only:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in names]
        if unknown or not chosen:
            parser.error(f"--only: unknown figure(s) {unknown}; choose from {', '.join(names)}")
    args.figures = [f for f in FIGURES if f.name in chosen]
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    figures: list[tuple[Figure[Any], Any]] = [
        (f, f.quick if args.quick else f.params) for f in args.figures
    ]
    runs = args.runs or (1 if args.quick else 5)
    out: Path | None = args.out
    if out is None and not args.quick and not args.only:
        out = REPO / "benchmarks"
    signal.signal(signal.SIGTERM, _on_terminate)
    signal.signal(signal.SIGHUP, _on_terminate)
    _raise_fd_limit(FD_LIMIT)
    started = datetime.datetime.now().astimezone()
    report: dict[str, Any] = {
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "command": command(argv),
        "quick": args.quick,
        "runs": runs,
        "figures": [f.name for f, _ in figures],
        "machine": machine_info(),
        "params": {f.name: asdict(p) for f, p in figures},
    }
    bench = Bench(figures, runs)
    t0 = time.monotonic()
    try:
        outcome = bench.run()
    finally:
        bench.cleanup()
    targets = evaluate_targets(figures, outcome.data)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarize(outcome.data)
    report["targets"] = [asdict(t) | {"met": t.met} for t in targets]
    report["errors"] = outcome.errors
    report["results"] = outcome.data
    print(render_markdown(report, figures))
    if targets:
        progress(targets_text(targets))
    if out is not None:
        json_path, readme = write_outputs(out, report, render_markdown(report, figures))
        progress(f"wrote {json_path} and {readme}")
    progress(f"done in {report['seconds']:.0f} s")
    return 1 if outcome.errors else 0
