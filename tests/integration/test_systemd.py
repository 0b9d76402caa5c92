"""``Type=notify``: the broker tells systemd it is ready, reloading and stopping, through a
real datagram socket named by ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker_process import REPO, BrokerProcess

SOURCE = """\
import os

from pbt_server import codeunit


@codeunit(600)
def notify_socket(ctx):
    return {"NOTIFY_SOCKET": os.environ.get("NOTIFY_SOCKET", "")}
"""


class Systemd:
    """The receiving end of ``$NOTIFY_SOCKET``."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Systemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"pbt-test-notify-{tmp_path.name}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    with sock:
        yield Systemd(sock, address)


def test_ready_reloading_and_stopping_reach_systemd(
    start_broker: Callable[..., BrokerProcess], systemd: Systemd, tmp_path: Path
) -> None:
    (tmp_path / "notified.py").write_text(SOURCE)
    broker = start_broker(
        {"Codeunits": {"Modules": "tests.codeunits, notified"}},
        env={"NOTIFY_SOCKET": systemd.address, "PYTHONPATH": str(tmp_path)},
    )
    ready = systemd.next()
    assert ready["READY"] == "1"
    assert "2 workers" in ready["STATUS"]

    # Workers and what codeunits start cannot speak for the broker.
    with broker.connect() as session:
        page = session.open_page("Cue")
        assert page.enqueue_background_task(600).result(30) == {"NOTIFY_SOCKET": ""}

    assert broker.process is not None
    broker.process.send_signal(signal.SIGHUP)
    reloading = systemd.next()
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert systemd.next()["READY"] == "1"

    # ExecReload runs `pbt-server reload`: its exit code tells systemd how the reload went.
    (tmp_path / "notified.py").write_text("raise ImportError('not today')\n")
    done = subprocess.run(
        [sys.executable, "-m", "pbt_server", "reload", "--config", str(broker.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert systemd.next()["RELOADING"] == "1"
    after = systemd.next()
    assert after["READY"] == "1"
    assert "reload refused" in after["STATUS"]

    assert broker.stop() == 0
    assert systemd.next()["STOPPING"] == "1"


def test_the_shipped_unit_file_runs_reloads_and_stops_the_broker() -> None:
    unit = REPO / "config" / "pbt-server.service"
    keys: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            keys[name.strip()] = value.strip()
    assert keys["Type"] == "notify"
    assert keys["KillMode"] == "control-group"
    assert " run --daemon --config " in keys["ExecStart"]
    assert " reload --config " in keys["ExecReload"]
    if shutil.which("systemd-analyze") is None:
        return  # the keys above are what matters; verify checks the rest where it exists
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify complains about the missing /opt/pbt-server install and user; anything else
    # it says about the unit is a mistake in it.
    problems = [
        line
        for line in (verify.stdout + verify.stderr).splitlines()
        if "pbt-server.service" in line and "/opt/pbt-server" not in line
    ]
    assert not problems, verify.stdout + verify.stderr
