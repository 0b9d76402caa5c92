#!/usr/bin/env python3
"""Benchmark pbt-server against ready-made process pools, side by side, in one run.

::

    .venv/bin/python scripts/bench.py               # 5 runs; writes benchmarks/results + README
    .venv/bin/python scripts/bench.py --quick       # smoke test, tiny counts; prints only
    .venv/bin/python scripts/bench.py --only latency,storm --runs 3 --out /tmp/b

Needs the ``bench`` extra (``pip install -e '.[bench]'``). Run from anywhere: brokers start
with the repository root as their working directory. The figures, the method and how to add
a figure: benchmarks/README.md; the code: the ``benchmarks`` package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the benchmark imports beyond the standard library (the broker's own needs included).
NEEDS = ("msgpack", "psutil", "multiprocessing_logging", "pebble")


def missing() -> list[str]:
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def main() -> int:
    if absent := missing():
        print(
            f"scripts/bench.py: {', '.join(absent)} not installed for {sys.executable}; "
            "install the bench extra: pip install -e '.[bench]' (in the repository root)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(REPO))  # benchmarks (the broker imports it from the root too)
    from benchmarks.cli import main as run

    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
