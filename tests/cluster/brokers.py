"""The cluster's brokers: ``pbt-server run --config config/cluster/broker-<host>.ini``, each in
its host's namespace, started from the repository root (the codeunit modules import from it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Final

import psutil

from pbt_server.client import connect
from pbt_server.daemon import Pidfile
from pbt_server.errors import ConnectionLost
from tests.broker_process import alive
from tests.cluster import netns
from tests.cluster.topology import HEALTH_CHECK, METRICS_PORT, REPO, Host, broker_config

_PROGRAM: Final = Path(sys.executable).with_name("pbt-server")


def socket_path(host: Host) -> Path:
    return host.state / "pbt.sock"


def log_file(host: Host) -> Path:
    return host.state / "pbt.log"


def _environment(host: Host) -> dict[str, str]:
    env = dict(os.environ)
    if HEALTH_CHECK == "http":  # the broker serves the endpoint HAProxy's check asks
        env["PBT_SERVER_METRICSADDRESS"] = f"{host.address}:{METRICS_PORT}"
    return env


def start(host: Host, timeout: float = 30.0) -> int:
    """Start the broker and wait until it answers on its socket; return its pid."""
    host.state.mkdir(parents=True, exist_ok=True)
    program = [str(_PROGRAM)] if _PROGRAM.exists() else [sys.executable, "-m", "pbt_server"]
    argv = [*program, "run", "--config", str(broker_config(host))]
    process = netns.spawn(
        host, argv, log=host.state / "stderr.log", cwd=REPO, env=_environment(host)
    )
    deadline = time.monotonic() + timeout
    while not _answers(host):
        if process.poll() is not None:
            raise netns.CommandFailed(
                f"broker {host.name} exited with {process.returncode}:\n{log_tail(host)}"
            )
        if time.monotonic() > deadline:
            raise netns.CommandFailed(f"broker {host.name} not ready in {timeout} s")
        time.sleep(0.05)
    return process.pid


def _answers(host: Host) -> bool:
    try:
        with connect(str(socket_path(host)), timeout=1) as session:
            session.ping()
        return True
    except (ConnectionLost, OSError):
        return False


def pid(host: Host) -> int | None:
    """The running broker's pid (from its pid file), or None."""
    return Pidfile(host.state / "pbt.pid").running_pid()


def worker_pids(host: Host) -> list[int]:
    broker = pid(host)
    if broker is None:
        return []
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(broker).children(recursive=True)]
    return []


def kill(host: Host) -> int:
    """SIGKILL the broker (its workers die with it); return the pid killed."""
    broker = pid(host)
    if broker is None:
        raise AssertionError(f"broker {host.name} is not running")
    os.kill(broker, signal.SIGKILL)
    return broker


def stop(host: Host, timeout: float = 20.0) -> None:
    """SIGTERM (graceful) if it runs; SIGKILL after ``timeout``."""
    broker = pid(host)
    if broker is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(broker, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(broker):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGKILL)
            break
        time.sleep(0.05)


def log_tail(host: Host) -> str:
    text = ""
    for path in (log_file(host), host.state / "stderr.log"):
        with contextlib.suppress(OSError):
            text += path.read_text(errors="replace")[-3000:]
    return text
