"""Build the cluster (:func:`up`), tear it down (:func:`down`), say how it is (:func:`status`).

``up`` goes bottom-up: network, primary, standby (streaming), brokers (their workers connect
to the standby at boot), balancer. ``down`` goes top-down and then makes sure: every process
left in one of our namespaces is killed, the namespaces are deleted, ``/tmp/pbt-cluster`` is
removed. It works on any remains, including those of an ``up`` that crashed half-way, and
does nothing when there is nothing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import time
from collections.abc import Callable
from functools import partial

import psutil

from tests.broker_process import alive
from tests.cluster import brokers, haproxy, netns, postgres
from tests.cluster.topology import (
    AUTH_TOKEN,
    BALANCER,
    BROKERS,
    CLIENT,
    HEALTH_CHECKS,
    NAMESPACES,
    PRIMARY,
    STANDBY,
    STATE,
    STATS_PORT,
    balancer_address,
)
from tests.pg import find_server_bin_dir

Say = Callable[[str], None]


def preflight() -> None:
    """Everything ``up`` needs, checked before anything is built."""
    if os.geteuid() != 0:
        raise netns.CommandFailed("the cluster needs root (network namespaces, runuser)")
    for program in ("ip", "haproxy", "runuser"):
        if shutil.which(program) is None:
            raise netns.CommandFailed(f"{program} is not installed (scripts/cluster installs it)")
    if find_server_bin_dir() is None:
        raise netns.CommandFailed("PostgreSQL is not installed: run scripts/ensure-postgres")
    for user in ("postgres", "haproxy"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise netns.CommandFailed(
                f"no OS user {user!r} (Debian's {user}ql package creates it)"
                if user == "postgres"
                else f"no OS user {user!r} (Debian's haproxy package creates it)"
            ) from None
    haproxy.check_config()  # the chosen health check; the other one must parse too
    for health_check in HEALTH_CHECKS:
        haproxy.check_config(health_check)


def is_up() -> bool:
    """True if anything of a cluster exists: its state directory or one of its namespaces."""
    return STATE.exists() or bool(netns.existing() & set(NAMESPACES))


def up(say: Say = print) -> None:
    """Build the whole topology; on failure, tear down what was built and raise."""
    preflight()
    if is_up():
        raise netns.CommandFailed(
            f"a cluster is up already ({STATE} or pbtc-* namespaces exist):"
            " run `scripts/cluster down` first"
        )
    STATE.mkdir(mode=0o755)
    try:
        _step(say, "network namespaces and bridge", netns.create)
        _step(say, f"PostgreSQL primary on {PRIMARY.address}", postgres.create_primary)
        _step(say, f"hot standby on {STANDBY.address} (pg_basebackup -R)", _standby)
        for broker in BROKERS:
            _step(say, f"broker {broker.name} on {broker.address}", partial(brokers.start, broker))
        _step(say, f"HAProxy on {BALANCER.address}", _balancer)
    except BaseException as err:
        say(f"up failed ({type(err).__name__}: {err}); tearing down what was built")
        down(say)
        raise
    address, port = balancer_address()
    say(
        f"cluster up: clients connect to {address}:{port} with token {AUTH_TOKEN!r} from the"
        f" client host, e.g.\n  ip netns exec {CLIENT.namespace} .venv/bin/python -c"
        f" \"from pbt_server.client import connect; s = connect(('{address}', {port}),"
        f" token='{AUTH_TOKEN}'); s.ping(); print(s)\"\n"
        f"  HAProxy's page: http://{BALANCER.address}:{STATS_PORT}/ (from the client host)"
    )


def _step(say: Say, what: str, action: Callable[[], object]) -> None:
    started = time.monotonic()
    action()
    say(f"  {what}: {time.monotonic() - started:.1f} s")


def _standby() -> None:
    postgres.create_standby()
    postgres.wait_streaming()


def _balancer() -> None:
    haproxy.start()
    for host in BROKERS:
        haproxy.wait_status(host.name, "UP")


def down(say: Say = print) -> None:
    """Stop everything, delete the namespaces and the state directory; verify nothing is left."""
    if not is_up():
        say("nothing to tear down")
        netns.reap()
        return
    _stop_balancer()
    for host in BROKERS:
        brokers.stop(host)
    for host in (STANDBY, PRIMARY):
        postgres.stop(host, mode="fast")
    live = netns.existing()
    for namespace in NAMESPACES:
        if namespace in live:
            _kill_everything_in(namespace, say)
    for namespace in NAMESPACES:
        if namespace in live:
            netns.delete(namespace)
    shutil.rmtree(STATE, ignore_errors=True)
    netns.reap()
    left = sorted(netns.existing() & set(NAMESPACES))
    if left or STATE.exists():
        raise netns.CommandFailed(f"down left {left or ''} {STATE if STATE.exists() else ''}")
    say("cluster down: no namespace, process or data directory left")


def _stop_balancer() -> None:
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int(haproxy.PID_FILE.read_text())
        if "haproxy" in " ".join(psutil.Process(pid).cmdline()):
            os.kill(pid, signal.SIGTERM)  # hard stop; SIGUSR1 would wait for every session
            _wait_gone({pid}, 10)


def _kill_everything_in(namespace: str, say: Say) -> None:
    """SIGKILL what is still inside ``namespace``: only our own processes can be there."""
    pids = set(netns.pids(namespace))
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            say(f"  killing leftover pid {pid} in {namespace}: {' '.join(process.cmdline())}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pids, 10)


def _wait_gone(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise netns.CommandFailed(f"processes {sorted(pids)} did not exit")
        netns.reap()
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def status(say: Say = print) -> bool:
    """Print what runs where; return False if no cluster is up."""
    if not is_up():
        say("no cluster is up")
        return False
    for namespace in NAMESPACES:
        pids = netns.pids(namespace) if namespace in netns.existing() else []
        say(f"{namespace}: {len(pids)} processes")
    for host in BROKERS:
        broker = brokers.pid(host)
        workers = brokers.worker_pids(host)
        say(
            f"broker {host.name}: {'pid ' + str(broker) if broker else 'not running'},"
            f" {len(workers)} workers"
        )
    with contextlib.suppress(OSError):
        for state in haproxy.servers().values():
            say(
                f"HAProxy {state.name}: {state.status} ({state.check}), {state.sessions}"
                " sessions now"
            )
    with contextlib.suppress(netns.CommandFailed):
        say(
            "replication: "
            + postgres.psql(
                PRIMARY,
                "SELECT application_name || ' ' || state || ' replay lag '"
                " || coalesce(replay_lag::text, '0') FROM pg_stat_replication",
                database="postgres",
            )
        )
    return True


def process_groups() -> dict[str, set[int]]:
    """The cluster's processes by part, for CPU accounting."""
    groups: dict[str, set[int]] = {"brokers": set(), "workers": set()}
    for host in BROKERS:
        broker = brokers.pid(host)
        if broker is not None and alive(broker):
            groups["brokers"].add(broker)
            groups["workers"] |= set(brokers.worker_pids(host))
    groups["haproxy"] = set(netns.pids(BALANCER.namespace))
    groups["standby"] = postgres.server_pids(STANDBY)
    groups["primary"] = postgres.server_pids(PRIMARY)
    return groups
