"""Scenario 1, basics: a cue through HAProxy reads the standby; sessions spread over both
brokers; a wrong token is refused through the balancer too; the standby refuses a write;
``connect([addresses])``; browser tabs through ``pbt-server web --broker`` and HAProxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psycopg

from pbt_server.client import connect
from pbt_server.errors import AuthenticationFailed, BackgroundTaskError
from tests.cluster import brokers
from tests.cluster.codeunits import BLOCKED_CUSTOMERS, TRY_WRITE, WHOAMI
from tests.cluster.report import Report
from tests.cluster.topology import (
    AUTH_TOKEN,
    BROKER1,
    BROKER2,
    BROKERS,
    CLIENT,
    PRIMARY,
    REPO,
    balancer_address,
    broker_address,
    owner_conninfo,
)
from tests.web import wsclient

BALANCER = balancer_address()
BLOCKED_QUERY = "SELECT count(*) FROM customer WHERE blocked <> ''"


def primary_blocked_count() -> int:
    with psycopg.connect(owner_conninfo(PRIMARY), autocommit=True) as db:
        row = db.execute(BLOCKED_QUERY).fetchone()
        assert row is not None
        return int(row[0])


def basics(report: Report) -> None:
    expected = primary_blocked_count()
    with connect(BALANCER, token=AUTH_TOKEN) as session:
        page = session.open_page("Role Center")
        results = page.enqueue_background_task(BLOCKED_CUSTOMERS).result(timeout=10)
        report.check(
            "cue through HAProxy",
            results["BlockedCustomers"] == str(expected),
            f"a cue through the balancer read {results['BlockedCustomers']} blocked customers"
            f" on the standby; the primary has {expected}",
        )
        try:
            page.enqueue_background_task(TRY_WRITE).result(timeout=10)
            report.check("standby refuses writes", False, "an INSERT on the standby succeeded")
        except BackgroundTaskError as err:
            report.check(
                "standby refuses writes",
                err.code == "DB:WriteDenied",
                f"a child session's INSERT failed with {err.code}: {err.text.strip()}",
            )

    pids = {host.name: brokers.pid(host) for host in BROKERS}
    sessions = [connect(BALANCER, token=AUTH_TOKEN) for _ in range(4)]
    try:
        landed = Counter(_whoami(session.open_page("Spread")) for session in sessions)
    finally:
        for session in sessions:
            session.close()
    by_name = {name: landed.get(pid or 0, 0) for name, pid in pids.items()}
    report.check(
        "leastconn spreads sessions",
        sorted(by_name.values()) == [2, 2],
        f"4 sessions opened one after another through HAProxy landed {by_name}",
    )

    for host in BROKERS:
        with connect(broker_address(host), token=AUTH_TOKEN) as session:
            pid = _whoami(session.open_page("Direct"))
        report.check(
            f"direct to {host.name}",
            pid == pids[host.name],
            f"a session to {host.address} directly ran on broker pid {pid}",
        )

    try:
        connect(BALANCER, token="not-the-token-at-all").close()
        report.check("token through HAProxy", False, "a wrong token was accepted")
    except AuthenticationFailed as err:
        report.check(
            "token through HAProxy", True, f"a wrong token is refused through it: {err.code}"
        )

    _address_list(report)
    _web_bridge(report)


def _whoami(page: Any) -> int:
    return int(page.enqueue_background_task(WHOAMI).result(timeout=10)["broker_pid"])


def _address_list(report: Report) -> None:
    """``connect([a, b])`` (tried in order): the first address here has no broker."""
    nowhere = (BROKER1.address, 7099)
    try:
        session = connect([nowhere, broker_address(BROKER2)], token=AUTH_TOKEN)
    except TypeError as err:
        report.skip(
            "connect([addresses])",
            f"this checkout's connect() takes no list of addresses ({err}); the check runs"
            " once the client has it",
        )
        return
    with session:
        pid = _whoami(session.open_page("List"))
    report.check(
        "connect([addresses])",
        pid == brokers.pid(BROKER2),
        f"connect([{nowhere[0]}:{nowhere[1]} (nothing there), b2]) ran on broker pid {pid}",
    )


def _web_bridge(report: Report) -> None:
    """``pbt-server web --broker <balancer>``: browser tabs (WebSockets) on the client host
    become parent sessions through HAProxy, spread over both brokers."""
    port = 8081
    origin = f"http://{CLIENT.address}:{port}"
    env = {
        **os.environ,
        "PBT_SERVER_AUTHTOKEN": AUTH_TOKEN,
        "PBT_WEB_ALLOWEDCODEUNITS": str(WHOAMI),
        "PBT_WEB_ALLOWEDORIGINS": origin,
    }
    balancer = f"{BALANCER[0]}:{BALANCER[1]}"
    argv = ["web", "--host", CLIENT.address, "--port", str(port), "--broker", balancer]
    web = subprocess.Popen(
        [sys.executable, "-m", "pbt_server", *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if not _listening(CLIENT.address, port, web):
            _, err = web.communicate(timeout=10)
            report.check("web bridge through HAProxy", False, f"did not start: {err[-500:]!r}")
            return
        pids = wsclient.run(_tabs(f"ws://{CLIENT.address}:{port}/ws", origin, 4))
    finally:
        web.terminate()
        web.communicate(timeout=20)
    brokers_used = {pid for pid in pids if pid in {brokers.pid(b) for b in BROKERS}}
    report.check(
        "web bridge through HAProxy",
        len(pids) == 4 and len(brokers_used) == 2,
        f"4 tabs through `pbt-server web --broker {balancer}` ran on brokers {sorted(pids)}",
    )


def _listening(host: str, port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        time.sleep(0.05)
    return False


async def _tabs(url: str, origin: str, count: int) -> list[int]:
    async def tab() -> int:
        socket_ = await wsclient.open_socket(url, origin)
        try:
            await wsclient.hello(socket_)
            page = await wsclient.request(
                socket_, {"op": "open_page", "rid": 1, "name": "Cue", "record": ""}
            )
            await wsclient.request(
                socket_,
                {
                    "op": "enqueue",
                    "rid": 2,
                    "page": page["page"],
                    "codeunit": WHOAMI,
                    "parameters": {},
                    "timeout": None,
                    "level": "Error",
                },
            )
            while True:
                message = await wsclient.receive(socket_)
                if message["op"] == "completed":
                    return int(message["results"]["broker_pid"])
        finally:
            await socket_.close()

    # All open at once, so that each balancer decision sees the others' sessions.
    return list(await asyncio.gather(*(tab() for _ in range(count))))
