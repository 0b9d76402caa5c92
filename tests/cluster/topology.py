"""The cluster's fixed facts: hosts, addresses, ports, credentials, paths.

Every host is a network namespace on one private /24 that no real network uses here
(10.77.0.0/24), joined by a bridge that lives in a namespace of its own, so the machine's own
network namespace gets no interface, address or route. The configuration files under
``config/cluster/`` spell the same addresses; ``tests/unit/test_cluster_config.py`` checks
that they agree with this module.

The credentials are test values, not secrets: the whole topology exists only on this
machine's private namespaces and is torn down by ``scripts/cluster down``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[2]
CONFIG: Final = REPO / "config" / "cluster"
STATE: Final = Path("/tmp/pbt-cluster")
"""Everything the running cluster writes: data directories, sockets, pid files, logs."""

NETWORK: Final = "10.77.0.0/24"
PREFIX_LENGTH: Final = 24
SWITCH: Final = "pbtc-switch"
"""The namespace holding the bridge every host's veth is plugged into."""
BRIDGE: Final = "br0"


@dataclass(frozen=True)
class Host:
    """One machine of the topology: a network namespace with one address."""

    name: str
    address: str

    @property
    def namespace(self) -> str:
        return f"pbtc-{self.name}"

    @property
    def state(self) -> Path:
        """This host's directory under :data:`STATE`."""
        return STATE / self.name


CLIENT: Final = Host("client", "10.77.0.2")
BALANCER: Final = Host("lb", "10.77.0.10")
BROKER1: Final = Host("b1", "10.77.0.11")
BROKER2: Final = Host("b2", "10.77.0.12")
PRIMARY: Final = Host("pg1", "10.77.0.21")
STANDBY: Final = Host("pg2", "10.77.0.22")
HOSTS: Final = (CLIENT, BALANCER, BROKER1, BROKER2, PRIMARY, STANDBY)
BROKERS: Final = (BROKER1, BROKER2)
NAMESPACES: Final = (*(host.namespace for host in HOSTS), SWITCH)

BROKER_PORT: Final = 7085
BALANCER_PORT: Final = 7085
STATS_PORT: Final = 8404
"""HAProxy's statistics page (HTTP) on the balancer."""
METRICS_PORT: Final = 9185
"""Where a broker serves its health endpoint once ``[Server] MetricsAddress`` exists."""
POSTGRES_PORT: Final = 5432

AUTH_TOKEN: Final = "pbt-cluster-test-token"
"""``[Server] AuthToken`` of both brokers (config/cluster/broker-*.ini)."""
DATABASE: Final = "erp"
OWNER: Final = "erp_owner"
"""The application's role: owns the tables and writes them, on the primary."""
OWNER_PASSWORD: Final = "erp-owner-test-password"
READER: Final = "pbt_reader"
"""The workers' role: SELECT only (config/cluster/postgresql/setup.sql)."""
READER_PASSWORD: Final = "pbt-reader-test-password"
REPLICATOR: Final = "replicator"
REPLICATOR_PASSWORD: Final = "replicator-test-password"
REPLICATION_SLOT: Final = "pbt_standby"
CUSTOMERS: Final = 5000
"""Rows of the ``customer`` table; every fifth one is blocked."""

HEALTH_CHECKS: Final = ("tcp", "http")
HEALTH_CHECK: Final = os.environ.get("PBT_CLUSTER_HEALTH_CHECK", "tcp")
"""HAProxy's check of the brokers: ``tcp`` (a connect to the broker's port) or ``http``
(``GET /health`` on :data:`METRICS_PORT`; needs the brokers' ``[Server] MetricsAddress``)."""


def broker_address(host: Host) -> tuple[str, int]:
    return (host.address, BROKER_PORT)


def balancer_address() -> tuple[str, int]:
    return (BALANCER.address, BALANCER_PORT)


def broker_config(host: Host) -> Path:
    return CONFIG / f"broker-{host.name}.ini"


def owner_conninfo(host: Host = PRIMARY) -> str:
    """How the application (and the harness, playing it) reaches a database server."""
    return (
        f"host={host.address} port={POSTGRES_PORT} dbname={DATABASE} user={OWNER}"
        f" password={OWNER_PASSWORD} connect_timeout=3"
    )
