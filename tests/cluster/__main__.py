"""``python -m tests.cluster up|test|down|status`` (``scripts/cluster`` is the way in).

``test`` builds the cluster, runs the scenarios inside the client host's namespace, and tears
the cluster down whatever happens (an exception, Ctrl-C, SIGTERM): it is the only owner of
what it built. It exits 0 when every check passed (skips are printed, and are not failures),
1 when one failed, 2 on bad usage, and 77 when this machine cannot make network namespaces
(the conventional "skipped" status, so that CI can tell a skip from a pass).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Final

from tests.cluster import cluster, netns
from tests.cluster.topology import CLIENT, REPO, STATE

EXIT_SKIPPED: Final = 77
_PR_SET_CHILD_SUBREAPER: Final = 36
_OWNER_FILE: Final = STATE / "built-by-test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="build the cluster and leave it running")
    test = commands.add_parser("test", help="build, run the scenarios, tear down")
    test.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    commands.add_parser("down", help="tear down everything a cluster left (idempotent)")
    commands.add_parser(
        "down-if-test-died", help="tear down only a cluster whose `test` process is gone"
    )
    commands.add_parser("status", help="what runs where")
    scenarios = commands.add_parser("scenarios", help="(inside the client namespace)")
    scenarios.add_argument("--json", metavar="PATH")
    for sub in (test, scenarios):
        sub.add_argument(
            "--only", action="append", metavar="NAME", help="run only this scenario (repeatable)"
        )
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cluster.up()
            return 0
        if args.command == "down":
            cluster.down()
            return 0
        if args.command == "down-if-test-died":
            return _down_if_test_died()
        if args.command == "status":
            return 0 if cluster.status() else 1
        if args.command == "test":
            return _test(args.json, args.only or [])
        from tests.cluster import scenarios as run_scenarios

        return run_scenarios.main(args.json, set(args.only or []))
    except netns.CommandFailed as err:
        print(f"scripts/cluster {args.command}: {err}", file=sys.stderr)
        return 1


def _test(json_path: str | None, only: list[str]) -> int:
    reason = netns.why_not_possible()
    if reason is not None:
        print(
            f"SKIPPED: scripts/cluster test cannot make network namespaces here ({reason});"
            " the scale-out scenarios did not run",
            file=sys.stderr,
        )
        return EXIT_SKIPPED
    # Orphans (the postmasters pg_ctl daemonizes) become our children, so we reap them.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if cluster.is_up():
        raise netns.CommandFailed(
            "a cluster is up already; `scripts/cluster test` builds its own:"
            " run `scripts/cluster down` first"
        )
    try:
        cluster.up()
        _OWNER_FILE.write_text(f"{os.getpid()}\n")
        command = [sys.executable, "-m", "tests.cluster", "scenarios"]
        if json_path:
            command += ["--json", os.path.abspath(json_path)]
        for name in only:
            command += ["--only", name]
        return subprocess.run(netns.in_namespace(CLIENT, command), cwd=REPO, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
        cluster.down()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _down_if_test_died() -> int:
    """The launcher's trap: clean up after a ``test`` process that died without doing so."""
    try:
        owner = int(_OWNER_FILE.read_text())
    except (OSError, ValueError):
        return 0  # no cluster, or one that `up` built: not ours to remove
    try:
        os.kill(owner, 0)
        return 0  # still alive: it tears down itself
    except ProcessLookupError:
        cluster.down()
        return 0


if __name__ == "__main__":
    sys.exit(main())
