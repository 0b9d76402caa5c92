"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` on a Unix socket in a temp dir.

``running_cluster()`` creates the cluster, a database ``pbt`` with the same ``customer`` table
as ``tests/broker_process.make_database`` (50 customers, 10 blocked) and two login roles:

- ``pbt_owner`` owns the database and the table and may write: the worst case, used to show
  that ``ctx.db`` itself refuses writes;
- ``pbt_reader`` may only ``SELECT`` (and defaults to read-only transactions): the set-up the
  README recommends.

The server listens on no TCP port (``listen_addresses = ''``), only on a socket in its own
temp dir, with ``trust`` authentication. PostgreSQL refuses to run as root, so when the tests
run as root the server commands run as the unprivileged ``postgres`` user (Debian's package
creates it) through ``runuser``. On exit the cluster is stopped and every server process is
checked to be gone.

Missing binaries fail the test with instructions; they never skip it: a skipped test would hide
a missing feature. ``scripts/ensure-postgres`` installs them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.support import wait_until

SUPERUSER = "postgres"
OWNER = "pbt_owner"
READER = "pbt_reader"
DATABASE = "pbt"
SERVER_USER = "postgres"  # the OS user the server runs as when the tests run as root

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_MISSING = (
    "PostgreSQL's server programs (initdb, pg_ctl, postgres) were found neither on PATH nor"
    " under /usr/lib/postgresql/*/bin. The database tests need a real server: run"
    " scripts/ensure-postgres (it installs Debian's `postgresql` package), then the tests again."
)


def find_server_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (the scripts/ensure-postgres rule).

    ``initdb`` on PATH first (resolved: Debian links it from its versioned directory), then the
    newest ``/usr/lib/postgresql/<version>/bin``.
    """
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    versioned = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versioned, key=_version_key, reverse=True)
    for directory in candidates:
        if all(os.access(directory / program, os.X_OK) for program in _SERVER_PROGRAMS):
            return directory
    return None


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"[0-9]+", bin_dir.parent.name)) or (0,)


@dataclass
class PostgresCluster:
    """A running cluster; ``url(role)`` is what ``[Database] Url`` takes."""

    directory: Path
    """Temp dir owned by the server user: ``data/``, the socket, ``server.log``."""
    bin_dir: Path
    run_as: tuple[str, ...]
    server_pids: set[int] = field(default_factory=set)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "server.log"

    def url(self, user: str = OWNER, database: str = DATABASE) -> str:
        return f"postgresql://{user}@/{database}?host={self.directory}"

    @property
    def owner_url(self) -> str:
        return self.url(OWNER)

    @property
    def reader_url(self) -> str:
        return self.url(READER)

    def connect(self, user: str = SUPERUSER, database: str = DATABASE) -> psycopg.Connection[Any]:
        """A direct connection (autocommit), bypassing pbt-server: to set up and to verify."""
        return psycopg.connect(
            host=str(self.directory), user=user, dbname=database, autocommit=True
        )

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    # --- lifecycle ------------------------------------------------------------------------

    def _run(self, *command: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [*self.run_as, *command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{self.log_text()}"
            )

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            f"--pgdata={self.data_dir}",
            f"--username={SUPERUSER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        server_options = (
            f"-k {self.directory} -c listen_addresses='' -c fsync=off"
            " -c full_page_writes=off -c synchronous_commit=off -c max_connections=40"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "start",
            f"--pgdata={self.data_dir}",
            f"--log={self.log_file}",
            "--wait",
            "--timeout=60",
            "--silent",
            f"--options={server_options}",
        )
        self._record_server_pids()

    def _record_server_pids(self) -> None:
        pid_file = (self.data_dir / "postmaster.pid").read_text().split()
        postmaster = psutil.Process(int(pid_file[0]))
        self.server_pids = {postmaster.pid} | {p.pid for p in postmaster.children(True)}

    def create_database(self, customers: int = 50) -> None:
        with self.connect(database="postgres") as admin:
            admin.execute(f"CREATE ROLE {OWNER} LOGIN")
            # The recommended set-up: SELECT only, read-only transactions by default.
            admin.execute(f"CREATE ROLE {READER} LOGIN")
            admin.execute(f"ALTER ROLE {READER} SET default_transaction_read_only = on")
            admin.execute(f"CREATE DATABASE {DATABASE} OWNER {OWNER}")
        with self.connect(OWNER) as owner:
            owner.execute(
                "CREATE TABLE customer"
                " (id serial PRIMARY KEY, name text NOT NULL, blocked integer NOT NULL)"
            )
            with owner.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO customer (name, blocked) VALUES (%s, %s)",
                    [(f"Customer {i}", int(i % 5 == 0)) for i in range(customers)],
                )
            owner.execute(f"GRANT SELECT ON customer TO {READER}")

    def stop(self) -> None:
        """Stop the server; fail if any of its processes outlives it."""
        if self.data_dir.joinpath("postmaster.pid").exists():
            with contextlib.suppress(OSError):
                self._record_server_pids()  # including backends started since
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    f"--pgdata={self.data_dir}",
                    "--mode=fast",
                    "--wait",
                    "--timeout=60",
                    "--silent",
                )
            finally:
                for pid in self.server_pids:  # only after a failed stop is any left
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(_alive(pid) for pid in self.server_pids), timeout=30)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _server_user() -> tuple[tuple[str, ...], int, int]:
    """How to run the server commands, and who must own the cluster's directory."""
    if os.geteuid() != 0:
        return (), os.getuid(), os.getgid()
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(
            f"the tests run as root, and PostgreSQL refuses to; they run it as the unprivileged"
            f" user {SERVER_USER!r}, which does not exist (Debian's postgresql package creates"
            " it; scripts/ensure-postgres installs that package)",
            pytrace=False,
        )
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("the tests run as root and need runuser to start PostgreSQL", pytrace=False)
    return (runuser, "-u", SERVER_USER, "--"), user.pw_uid, user.pw_gid


@contextlib.contextmanager
def running_cluster(customers: int = 50) -> Iterator[PostgresCluster]:
    """Start a cluster with the ``pbt`` database; stop it and remove its files on exit."""
    bin_dir = find_server_bin_dir()
    if bin_dir is None:
        pytest.fail(_MISSING, pytrace=False)
    run_as, uid, gid = _server_user()
    directory = Path(tempfile.mkdtemp(prefix="pbt-pg-", dir="/tmp"))  # short: socket path
    try:
        os.chown(directory, uid, gid)
        cluster = PostgresCluster(directory, bin_dir, run_as)
        try:
            cluster.start()
            cluster.create_database(customers)
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
