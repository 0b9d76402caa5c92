#!/usr/bin/env python3
"""Protocol fuzzing, the long version: tests/integration/test_fuzz.py with more examples.

::

    scripts/fuzz.py [--examples N] [--seed N] [-k EXPR]

Runs the fuzz module under pytest against one live broker (hostile frames of every kind,
requests in any order, a bystander session and a ping prober alongside; see the module's
docstring), with ``N`` Hypothesis examples per test (the request-order state machine runs
``N / 5`` programs). Prints how many cases each test ran. Exit code: pytest's (0 = no bug).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per test")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default random)")
    parser.add_argument("-k", dest="keyword", default=None, help="only tests matching EXPR")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    os.environ["PBT_FUZZ_EXAMPLES"] = str(max(1, args.examples))
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    import pytest

    options = [
        "tests/integration/test_fuzz.py",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        f"--hypothesis-seed={seed}",
        "-o",
        "timeout=0",
    ]
    if args.keyword:
        options += ["-k", args.keyword]
    print(f"fuzz: {args.examples} examples per test, seed {seed}", flush=True)
    code = int(pytest.main(options))
    module = sys.modules.get("tests.integration.test_fuzz")
    cases = dict(getattr(module, "CASES", {}))
    total = sum(n for name, n in cases.items() if not name.endswith("(steps)"))
    print(f"fuzz: {total} cases ran (seed {seed}): {cases}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
