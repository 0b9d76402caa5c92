"""The cluster's configuration files agree with each other and with tests/cluster/topology.py,
and the harness's ledger judges outcomes right. No processes: ``scripts/cluster test`` is the
test of the running topology."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from pbt_server.config import load_config
from tests.cluster import haproxy
from tests.cluster.load import Ledger
from tests.cluster.topology import (
    AUTH_TOKEN,
    BALANCER,
    BALANCER_PORT,
    BROKER_PORT,
    BROKERS,
    CLIENT,
    CONFIG,
    DATABASE,
    PRIMARY,
    READER,
    READER_PASSWORD,
    REPLICATOR,
    STANDBY,
    STATE,
    broker_config,
)

HAPROXY = (CONFIG / "haproxy.cfg").read_text()
PG_HBA = (CONFIG / "postgresql" / "pg_hba.conf").read_text()


def _setting(path: Path, key: str) -> str:
    match = re.search(rf"^{key}\s*=\s*'([^']*)'", path.read_text(), re.MULTILINE)
    assert match, f"{path}: no {key}"
    return match.group(1)


@pytest.mark.parametrize("host", BROKERS, ids=lambda host: host.name)
def test_broker_ini_is_a_valid_server_config_for_its_host(host):
    config = load_config(broker_config(host), environ={})
    assert config.server.tcp_address == (host.address, BROKER_PORT)
    assert config.server.auth_token == AUTH_TOKEN
    assert config.server.socket_path == host.state / "pbt.sock"
    assert config.codeunits.modules == ("tests.cluster.codeunits",)
    url = conninfo_to_dict(config.database.url.text)
    assert (url["host"], url["dbname"], url["user"]) == (STANDBY.address, DATABASE, READER)
    assert url["password"] == READER_PASSWORD


def test_haproxy_balances_the_brokers_in_tcp_mode():
    assert f"bind {BALANCER.address}:{BALANCER_PORT}\n" in HAPROXY
    servers = re.findall(r"^\s*server (\S+) (\S+)$", HAPROXY, re.MULTILINE)
    assert servers == [(host.name, f"{host.address}:{BROKER_PORT}") for host in BROKERS]
    assert re.search(r"^\s*mode tcp$", HAPROXY, re.MULTILINE)
    assert re.search(r"^\s*balance leastconn$", HAPROXY, re.MULTILINE)
    assert f"stats socket {haproxy.ADMIN_SOCKET} " in HAPROXY


def test_postgres_servers_listen_on_their_hosts():
    for host, name in ((PRIMARY, "primary.conf"), (STANDBY, "standby.conf")):
        path = CONFIG / "postgresql" / name
        assert _setting(path, "listen_addresses") == host.address
        assert _setting(path, "unix_socket_directories") == str(host.state)
    assert str(STATE) == "/tmp/pbt-cluster"


def test_pg_hba_lets_in_exactly_the_parts_that_need_it():
    rules = [line.split() for line in PG_HBA.splitlines() if line and not line.startswith("#")]
    host_rules = {(r[1], r[2], r[3]) for r in rules if r[0] == "host" and r[4] != "reject"}
    assert host_rules == {
        (DATABASE, "erp_owner", f"{CLIENT.address}/32"),
        *((DATABASE, READER, f"{host.address}/32") for host in BROKERS),
        *(("replication", REPLICATOR, f"{host.address}/32") for host in (PRIMARY, STANDBY)),
    }
    assert all(r[4] == "scram-sha-256" for r in rules if r[0] == "host" and r[4] != "reject")
    assert rules[-2:] == [
        ["host", "all", "all", "0.0.0.0/0", "reject"],
        ["host", "all", "all", "::/0", "reject"],
    ]


# --- the ledger ------------------------------------------------------------------------------


def test_ledger_accepts_one_outcome_with_its_trigger():
    ledger = Ledger()
    ledger.accept(("s", 0, 1))
    ledger.settle(("s", 0, 1), "completed")
    ledger.trigger(("s", 0, 1), "completed")
    ledger.accept(("s", 0, 2))
    ledger.settle(("s", 0, 2), "error", "OperationalError", "connection refused")
    ledger.trigger(("s", 0, 2), "error", "OperationalError")
    assert ledger.problems() == []
    assert ledger.outcomes() == {"completed": 1, "error:OperationalError": 1}


def test_ledger_reports_two_outcomes_a_missing_and_a_mismatched_trigger():
    ledger = Ledger()
    for task in (1, 2, 3):
        ledger.accept(("s", 0, task))
    ledger.settle(("s", 0, 1), "completed")
    ledger.settle(("s", 0, 1), "lost")
    ledger.settle(("s", 0, 2), "completed")
    ledger.settle(("s", 0, 3), "completed")
    ledger.trigger(("s", 0, 3), "error", "ValueError")
    problems = ledger.problems()
    assert len(problems) == 3
    assert "2 outcomes" in problems[0]
    assert "no trigger ran" in problems[1]
    assert "trigger ('error', 'ValueError') but handle ('completed', '')" in problems[2]
    assert ledger.awaiting_triggers() == 2  # tasks 1 and 2: their triggers may be on the way


def test_ledger_needs_no_trigger_on_a_lost_connection_and_forbids_one_for_lost_tasks():
    ledger = Ledger()
    ledger.lost_connections.add(("s", 0))
    ledger.accept(("s", 0, 1))
    ledger.settle(("s", 0, 1), "completed")  # resolved; the session ended before its trigger
    ledger.accept(("s", 0, 2))
    ledger.settle(("s", 0, 2), "lost")
    assert ledger.problems() == []
    ledger.trigger(("s", 0, 2), "completed")
    assert ledger.problems() == [
        f"{('s', 0, 2)}: trigger ('completed', '') but handle ('lost', '')"
    ]
