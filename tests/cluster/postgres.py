"""The cluster's PostgreSQL servers: a primary (pg1) and a streaming hot standby (pg2).

The primary is made with ``initdb``, configured from ``config/cluster/postgresql/`` and set up
with ``setup.sql`` (roles, database, rows). The standby is ``pg_basebackup -R`` of it over the
network, through a replication slot, as the ``replicator`` role: PostgreSQL's own tools, run
inside each host's namespace. The servers run as the OS user ``postgres`` (PostgreSQL refuses
root) through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import time
from pathlib import Path
from typing import Final

import psutil

from tests.cluster import netns
from tests.cluster.topology import (
    CONFIG,
    CUSTOMERS,
    DATABASE,
    OWNER_PASSWORD,
    POSTGRES_PORT,
    PRIMARY,
    READER_PASSWORD,
    REPLICATION_SLOT,
    REPLICATOR,
    REPLICATOR_PASSWORD,
    STANDBY,
    Host,
)
from tests.pg import find_server_bin_dir

SERVER_USER: Final = "postgres"
SETTINGS: Final = CONFIG / "postgresql"
HOST_SETTINGS: Final = {PRIMARY: "primary.conf", STANDBY: "standby.conf"}


def data_dir(host: Host) -> Path:
    return host.state / "data"


def log_file(host: Host) -> Path:
    return host.state / "server.log"


def _bin(program: str) -> str:
    directory = find_server_bin_dir()
    if directory is None:
        raise netns.CommandFailed(
            "PostgreSQL's server programs (initdb, pg_ctl, postgres) are missing:"
            " run scripts/ensure-postgres (scripts/cluster does)"
        )
    return str(directory / program)


def _as_server_user(host: Host, program: str, *args: str) -> list[str]:
    return netns.in_namespace(host, ["runuser", "-u", SERVER_USER, "--", _bin(program), *args])


def _own_directory(host: Host) -> None:
    """The host's state directory, owned by the server user (data dir, socket, log)."""
    user = pwd.getpwnam(SERVER_USER)
    host.state.mkdir(parents=True, exist_ok=True)
    os.chown(host.state, user.pw_uid, user.pw_gid)
    host.state.chmod(0o700)


def _install_settings(host: Host) -> None:
    """Put the cluster's settings into the data directory and include them."""
    data = data_dir(host)
    user = pwd.getpwnam(SERVER_USER)
    for source, target in [
        (SETTINGS / "cluster.conf", "cluster.conf"),
        (SETTINGS / HOST_SETTINGS[host], "host.conf"),
        (SETTINGS / "pg_hba.conf", "pg_hba.conf"),
    ]:
        shutil.copyfile(source, data / target)
        os.chown(data / target, user.pw_uid, user.pw_gid)
    main = data / "postgresql.conf"
    include = "include 'cluster.conf'\ninclude 'host.conf'\n"
    if include not in main.read_text():  # the standby's copy has it already
        with main.open("a") as file:
            file.write(f"\n# scripts/cluster\n{include}")


def start(host: Host) -> None:
    netns.run(
        _as_server_user(
            host,
            "pg_ctl",
            "start",
            f"--pgdata={data_dir(host)}",
            f"--log={log_file(host)}",
            "--wait",
            "--timeout=60",
            "--silent",
        ),
        timeout=90,
    )


def stop(host: Host, mode: str = "fast") -> None:
    """Stop the server if it runs (a missing or dead server is not an error)."""
    if not (data_dir(host) / "postmaster.pid").exists():
        return
    netns.run(
        _as_server_user(
            host,
            "pg_ctl",
            "stop",
            f"--pgdata={data_dir(host)}",
            f"--mode={mode}",
            "--wait",
            "--timeout=30",
            "--silent",
        ),
        timeout=60,
        check=False,
    )


def psql(host: Host, sql: str, database: str = DATABASE) -> str:
    """Run ``sql`` as the superuser over the host's Unix socket; return unaligned rows."""
    return netns.run(
        _as_server_user(
            host,
            "psql",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            f"--host={host.state}",
            f"--port={POSTGRES_PORT}",
            f"--username={SERVER_USER}",
            f"--dbname={database}",
            "-c",
            sql,
        )
    ).strip()


def create_primary() -> None:
    _own_directory(PRIMARY)
    netns.run(
        _as_server_user(
            PRIMARY,
            "initdb",
            f"--pgdata={data_dir(PRIMARY)}",
            f"--username={SERVER_USER}",
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",  # a test cluster: initdb's own files need not survive a power cut
        ),
        timeout=120,
    )
    _install_settings(PRIMARY)
    start(PRIMARY)
    setup = PRIMARY.state / "setup.sql"  # readable by the server user, wherever the repo is
    shutil.copyfile(SETTINGS / "setup.sql", setup)
    os.chmod(setup, 0o644)
    netns.run(
        _as_server_user(
            PRIMARY,
            "psql",
            "-X",
            "-q",
            f"--host={PRIMARY.state}",
            f"--port={POSTGRES_PORT}",
            f"--username={SERVER_USER}",
            "--dbname=postgres",
            "-v",
            f"owner_password={OWNER_PASSWORD}",
            "-v",
            f"reader_password={READER_PASSWORD}",
            "-v",
            f"replicator_password={REPLICATOR_PASSWORD}",
            "-v",
            f"customers={CUSTOMERS}",
            "-f",
            str(setup),
        )
    )


def create_standby() -> None:
    """Clone the primary over the network with ``pg_basebackup -R`` and start it."""
    _own_directory(STANDBY)
    user = pwd.getpwnam(SERVER_USER)
    passfile = STANDBY.state / "pgpass"
    passfile.write_text(
        f"{PRIMARY.address}:{POSTGRES_PORT}:replication:{REPLICATOR}:{REPLICATOR_PASSWORD}\n"
    )
    os.chown(passfile, user.pw_uid, user.pw_gid)
    passfile.chmod(0o600)
    netns.run(
        netns.in_namespace(
            STANDBY,
            [
                "runuser",
                "-u",
                SERVER_USER,
                "--",
                "env",
                f"PGPASSFILE={passfile}",
                _bin("pg_basebackup"),
                f"--host={PRIMARY.address}",
                f"--port={POSTGRES_PORT}",
                f"--username={REPLICATOR}",
                f"--pgdata={data_dir(STANDBY)}",
                "--write-recovery-conf",  # -R: primary_conninfo + standby.signal
                "--create-slot",
                f"--slot={REPLICATION_SLOT}",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-password",
                "--no-sync",
            ],
        ),
        timeout=180,
    )
    _install_settings(STANDBY)
    start(STANDBY)


def wait_streaming(timeout: float = 30) -> None:
    """Wait until the standby streams from the primary through its slot."""
    query = (
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s"
        f" ON s.active_pid = r.pid WHERE s.slot_name = '{REPLICATION_SLOT}'"
        " AND r.state = 'streaming'"
    )
    deadline = time.monotonic() + timeout
    while psql(PRIMARY, query, database="postgres") != "1":
        if time.monotonic() > deadline:
            raise netns.CommandFailed(
                f"the standby is not streaming after {timeout:.0f} s:\n{log_text(STANDBY)}"
            )
        time.sleep(0.1)


def in_recovery(host: Host) -> bool:
    return psql(host, "SELECT pg_is_in_recovery()", database="postgres") == "t"


def server_pids(host: Host) -> set[int]:
    """The postmaster and its children (backends, walsender/walreceiver …)."""
    try:
        first = (data_dir(host) / "postmaster.pid").read_text().split()[0]
        postmaster = psutil.Process(int(first))
        return {postmaster.pid} | {child.pid for child in postmaster.children(recursive=True)}
    except (OSError, IndexError, ValueError, psutil.Error):
        return set()


def log_text(host: Host) -> str:
    with contextlib.suppress(OSError):
        return log_file(host).read_text(errors="replace")[-4000:]
    return ""
