"""``pbt-server demo`` runs to completion and shows both seed examples.

The real command (``python -m pbt_server demo --config …``), with a config whose socket, pid
file, log and database all live in a temp dir: it creates the demo database, starts its own
server, plays the Role Center cue and the Customer Card, and stops the server again.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from pbt_server.demo import CUSTOMERS, create_database
from tests.broker_process import REPO, BrokerProcess, alive, write_ini
from tests.support import wait_until


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pbt-demo-", dir="/tmp"))  # short: AF_UNIX paths
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _config(directory: Path) -> Path:
    ini = directory / "server.ini"
    write_ini(
        ini,
        {
            "Server": {
                "SocketPath": str(directory / "pbt.sock"),
                "PidFile": str(directory / "pbt.pid"),
                "LogFile": str(directory / "pbt.log"),
            },
            "Workers": {"Count": "2"},
            "Database": {"Url": f"sqlite:///{directory}/demo.db"},
        },
    )
    return ini


def _demo(ini: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pbt_server", "demo", "--config", str(ini)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _blocked(db: Path) -> int:
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM customer WHERE blocked <> ''"
        ).fetchone()
    connection.close()
    assert isinstance(count, int)
    return count


def _find(pattern: str, out: str) -> int:
    """Where ``pattern`` (a whole line, after its indent) is in the demo's output."""
    match = re.search(rf"^ *{pattern}$", out, re.M)
    assert match, f"no line matches {pattern!r} in:\n{out}"
    return match.start()


def _assert_both_examples(out: str, blocked: int) -> None:
    ms = r"[0-9.]+ ms  "
    # Role Center cue: '-' at once, the page keeps responding, then the count.
    rendered = _find(rf"{ms}page rendered: +Blocked customers \[-\]", out)
    responsive = _find(rf"{ms}page responsive: user action #1 handled", out)
    filled = _find(rf"{ms}cue filled: +Blocked customers \[{blocked}\]", out)
    assert rendered < responsive < filled, out
    # Customer Card: completed; cancelled by the record change, no trigger; timed out.
    completed = _find(
        rf"{ms}OnPageBackgroundTaskCompleted\(task [0-9]+\): "
        r"Before \S+ \S+, Duration [0-9]+ ms, After \S+ \S+",
        out,
    )
    cancelled = _find(r"task [0-9]+ cancelled \(RecordChanged\); no trigger ran: True", out)
    error_trigger = _find(
        rf"{ms}OnPageBackgroundTaskError\(task [0-9]+\): ChildSessionTaskTimeout: .+", out
    )
    notification = _find(r"notification \(Warning\): ChildSessionTaskTimeout: .+", out)
    assert filled < completed < cancelled < error_trigger < notification, out


def _no_process_uses(ini: Path) -> bool:
    """No broker or worker started with this config is left (workers share the command line)."""
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if str(ini) in (process.info["cmdline"] or []) and (
                process.info["status"] != psutil.STATUS_ZOMBIE
            ):
                return False
        except psutil.Error:
            continue
    return True


def test_the_demo_runs_to_completion(demo_dir: Path) -> None:
    ini = _config(demo_dir)
    out = _demo(ini)

    db = demo_dir / "demo.db"
    blocked = _blocked(db)
    assert 0 < blocked < CUSTOMERS
    assert f"created demo database {db}: {CUSTOMERS} customers, {blocked} blocked" in out
    started = re.search(r"^started pbt-server \(pid ([0-9]+)\) on (\S+);", out, re.M)
    assert started, out
    assert started[2] == str(demo_dir / "pbt.sock")
    _assert_both_examples(out, blocked)
    assert out.rstrip().endswith("stopped pbt-server (exit code 0)"), out

    server_pid = int(started[1])
    wait_until(lambda: not alive(server_pid) and _no_process_uses(ini), timeout=10)
    assert not (demo_dir / "pbt.sock").exists()
    assert not (demo_dir / "pbt.pid").exists()


def test_the_demo_uses_a_server_that_is_already_running(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="pbt-demo-", dir="/tmp"))
    try:
        blocked = create_database(directory / "demo.db")
        broker = start_broker(
            {
                "Codeunits": {"Modules": "workers.demo"},
                "Database": {"Url": f"sqlite:///{directory}/demo.db"},
            }
        )
        out = _demo(broker.config)
        assert f"using the pbt-server already running on {broker.socket}" in out
        assert "created demo database" not in out
        _assert_both_examples(out, blocked)
        assert broker.process is not None
        assert broker.process.poll() is None  # the demo left it running
    finally:
        shutil.rmtree(directory, ignore_errors=True)
