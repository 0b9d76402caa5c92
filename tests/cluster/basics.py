"""Scenario 1, basics: a cue through HAProxy reads the standby; sessions spread over both
brokers; a wrong token is refused through the balancer too; the standby refuses a write;
``connect([addresses])`` and the web bridge if this checkout has them.
"""

from __future__ import annotations

import importlib.util
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
    PRIMARY,
    balancer_address,
    broker_address,
    owner_conninfo,
)

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
    if importlib.util.find_spec("pbt_server.web") is None:
        report.skip(
            "web bridge through HAProxy",
            "pbt_server.web is not in this checkout; the check runs once it is",
        )
        return
    report.skip(
        "web bridge through HAProxy",
        "pbt_server.web exists, but this scenario is not yet written against its API"
        " (create_app's arguments): wire it in tests/cluster/scenarios.py",
    )
