"""HAProxy on the balancer host: start it, and ask it (runtime API) what it thinks of the brokers.

The runtime API is HAProxy's admin socket (``stats socket`` in ``config/cluster/haproxy.cfg``):
``show stat`` gives each server's state as HAProxy's health checks see it, and ``set server``
takes a broker out of rotation (``maint``) or puts it back (``ready``), as an operator would.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Final

from tests.cluster import netns
from tests.cluster.topology import BALANCER, CONFIG, HEALTH_CHECK, HEALTH_CHECKS

CONFIG_FILE: Final = CONFIG / "haproxy.cfg"
ADMIN_SOCKET: Final = BALANCER.state / "admin.sock"
PID_FILE: Final = BALANCER.state / "haproxy.pid"
LOG_FILE: Final = BALANCER.state / "haproxy.log"
BACKEND: Final = "brokers"


def _environment(health_check: str = HEALTH_CHECK) -> dict[str, str]:
    if health_check not in HEALTH_CHECKS:
        raise netns.CommandFailed(
            f"PBT_CLUSTER_HEALTH_CHECK={health_check!r}: expected one of {', '.join(HEALTH_CHECKS)}"
        )
    return {**os.environ, "PBT_CLUSTER_HEALTH_CHECK": health_check}


def check_config(health_check: str = HEALTH_CHECK) -> None:
    """``haproxy -c``: the configuration parses, with that health check."""
    result = subprocess.run(
        ["haproxy", "-c", "-q", "-f", str(CONFIG_FILE)],
        env=_environment(health_check),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise netns.CommandFailed(
            f"{CONFIG_FILE} (health check {health_check}):"
            f" {(result.stderr or result.stdout).strip()}"
        )


def start() -> int:
    """Start HAProxy in the foreground of a new session, logging to its file; return its pid."""
    BALANCER.state.mkdir(parents=True, exist_ok=True)
    process = netns.spawn(
        BALANCER, ["haproxy", "-db", "-f", str(CONFIG_FILE)], log=LOG_FILE, env=_environment()
    )
    PID_FILE.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise netns.CommandFailed(
                f"haproxy exited with {process.returncode}: {LOG_FILE.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError):
            command("show info")
            return process.pid
        if time.monotonic() > deadline:
            raise netns.CommandFailed("haproxy's admin socket did not answer within 20 s")
        time.sleep(0.05)


def command(text: str, timeout: float = 5.0) -> str:
    """One runtime API command; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(ADMIN_SOCKET))
        sock.sendall(text.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass(frozen=True)
class ServerState:
    """One broker as HAProxy sees it."""

    name: str
    status: str
    """``UP``, ``DOWN``, ``MAINT``, or a transition such as ``UP 1/2`` (going down)."""
    sessions: int
    """Connections open to it now."""
    total: int
    """Connections it was given since HAProxy started."""
    check: str
    """The last check's result, e.g. ``L4OK``, ``L4CON`` (refused), ``L7OK``."""


def servers() -> dict[str, ServerState]:
    """The brokers' states, by server name."""
    text = command("show stat").lstrip("# ")
    states = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND"):
            states[row["svname"]] = ServerState(
                row["svname"],
                row["status"],
                int(row["scur"] or 0),
                int(row["stot"] or 0),
                row["check_status"],
            )
    return states


def set_state(server: str, state: str) -> None:
    """``ready``, ``drain`` or ``maint``: what an operator does to take a broker out."""
    answer = command(f"set server {BACKEND}/{server} state {state}").strip()
    if answer:
        raise netns.CommandFailed(f"set server {server} state {state}: {answer}")


def wait_status(server: str, wanted: str, timeout: float = 15.0) -> float:
    """Wait until ``server``'s status is ``wanted``; return how long it took (s)."""
    started = time.monotonic()
    while True:
        state = servers().get(server)
        if state is not None and state.status == wanted:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"HAProxy: {server} is {state} after {timeout} s, not {wanted}")
        time.sleep(0.02)
