"""Network namespaces: one per host, all plugged into one bridge in a namespace of its own.

::

    pbtc-client  pbtc-lb  pbtc-b1  pbtc-b2  pbtc-pg1  pbtc-pg2     (eth0 in each: 10.77.0.x/24)
         │          │        │        │        │         │
         └──────────┴────────┴──br0───┴────────┴─────────┘         (pbtc-switch: v-<host> ports)

Each veth pair is created with both ends already in their namespaces, so the machine's own
namespace never sees an interface of ours. Deleting a namespace deletes its veth end (and the
peer with it); a namespace lives on while a process is inside it, so processes go first.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.cluster.topology import BRIDGE, HOSTS, NAMESPACES, PREFIX_LENGTH, SWITCH, Host

PROBE = "pbtc-probe"


class CommandFailed(RuntimeError):
    """A command the cluster needs exited with an error."""


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True) -> str:
    """Run ``argv``; return its stdout, or raise :class:`CommandFailed` with its output."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise CommandFailed(f"{argv[0]}: not found ({err})") from err
    if check and result.returncode != 0:
        raise CommandFailed(
            f"`{' '.join(argv)}` failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def in_namespace(host: Host, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``host``'s network namespace."""
    return ["ip", "netns", "exec", host.namespace, *argv]


_spawned: list[subprocess.Popen[bytes]] = []
"""Handles of the long-lived processes this process started: kept, so that they can be reaped
once they exit (no zombie) and no handle of a running child is garbage-collected."""


def spawn(
    host: Host,
    argv: Sequence[str],
    *,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``host``'s namespace, in a session of its own, output to ``log``.

    ``ip netns exec`` execs the command, so the handle's pid is the command's own.
    """
    with log.open("ab") as output:
        process = subprocess.Popen(
            in_namespace(host, argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    _spawned.append(process)
    return process


def reap() -> None:
    """Collect every child of ours that has exited (including orphans we are subreaper of)."""
    for process in _spawned:
        process.poll()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def existing() -> set[str]:
    """The names of the network namespaces that exist now."""
    listing = run(["ip", "netns", "list"])
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def why_not_possible() -> str | None:
    """None if this machine lets us make namespaces and veth pairs; else the reason."""
    try:
        run(["ip", "netns", "add", PROBE])
    except CommandFailed as err:
        return str(err)
    try:
        run(
            [
                "ip",
                "-n",
                PROBE,
                "link",
                "add",
                "name",
                "probe0",
                "type",
                "veth",
                "peer",
                "name",
                "probe1",
            ]
        )
    except CommandFailed as err:
        return str(err)
    finally:
        run(["ip", "netns", "del", PROBE], check=False)
    return None


def create() -> None:
    """Make the switch and every host, each with its address; fails if any exists."""
    taken = existing() & set(NAMESPACES)
    if taken:
        raise CommandFailed(
            f"namespaces {', '.join(sorted(taken))} exist already: run `scripts/cluster down`"
        )
    run(["ip", "netns", "add", SWITCH])
    run(["ip", "-n", SWITCH, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", SWITCH, "link", "set", BRIDGE, "up"])
    for host in HOSTS:
        _add_host(host)


def _add_host(host: Host) -> None:
    ns, port = host.namespace, f"v-{host.name}"
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(
        [
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            SWITCH,
        ]
    )
    run(["ip", "-n", SWITCH, "link", "set", port, "master", BRIDGE])
    run(["ip", "-n", SWITCH, "link", "set", port, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])


def pids(namespace: str) -> list[int]:
    """The processes inside ``namespace`` (empty if it does not exist)."""
    out = run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def delete(namespace: str) -> None:
    run(["ip", "netns", "del", namespace], check=False)
