#!/usr/bin/env python3
"""Chaos run: many sessions, misbehaving codeunits, killed and frozen workers, dropped clients.

::

    scripts/chaos.py [--quick] [--seed N] [--tasks N] [--sessions N] [--clients N] [-v]

Runs the harness of ``tests/chaos/`` (its docstring lists what is checked) against one live
broker: ledger clients enqueue, cancel, change records and break connections while workers
are SIGKILLed and SIGSTOPped, victim clients are killed, the harness writes to the database
and reloads the broker. Prints the counts and every violation (each names the seed, client,
session and task). Exit code: 0 = no violation.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = (
    "tasks",
    "sessions",
    "clients",
    "sync_clients",
    "victims",
    "workers",
    "max_tasks_per_worker",
    "kill_interval",
    "stop_interval",
    "log_level",
    "inject",
    "stall_timeout",
    "write_interval",
    "reload_interval",
    "journal",
    "cancel_grace",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few thousand tasks, for CI")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--tasks", type=int, help="accepted tasks to run (default 100000)")
    parser.add_argument("--sessions", type=int, help="concurrent ledger sessions")
    parser.add_argument("--clients", type=int, help="ledger client processes")
    parser.add_argument("--sync-clients", type=int, help="of which use the blocking client")
    parser.add_argument("--victims", type=int, help="client processes killed at random")
    parser.add_argument("--workers", type=int, help="broker worker processes")
    parser.add_argument("--max-tasks-per-worker", type=int, help="recycle workers (0: never)")
    parser.add_argument("--kill-interval", type=float, help="mean s between worker SIGKILLs")
    parser.add_argument("--stop-interval", type=float, help="mean s between worker SIGSTOPs")
    parser.add_argument("--log-level", help="the broker's LogLevel (default WARNING)")
    parser.add_argument(
        "--inject",
        choices=["drop", "duplicate", "misroute", "late_progress"],
        help="self-test: tamper with client-side events; the run must report violations",
    )
    parser.add_argument("--stall-timeout", type=float, help="s without progress = lost tasks")
    parser.add_argument(
        "--write-interval", type=float, help="mean s between the harness's database writes"
    )
    parser.add_argument("--reload-interval", type=float, help="mean s between reloads (0: none)")
    parser.add_argument(
        "--journal", choices=["wal", "delete"], help="SQLite journal mode (default: by the seed)"
    )
    parser.add_argument("--cancel-grace", help="[Workers] CancelGrace (default 00:00:00.050)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress every 10 s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.chaos import ChaosConfig, run_chaos

    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 31)
    config = ChaosConfig.quick(seed) if args.quick else ChaosConfig(seed=seed)
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.verbose = args.verbose
    config.clients = max(1, config.clients)
    print(
        f"chaos: seed {config.seed}, {config.tasks} tasks, {config.sessions} sessions in "
        f"{config.clients} clients, {config.workers} workers",
        flush=True,
    )
    report = run_chaos(config)
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
