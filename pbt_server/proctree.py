"""Killing a worker and everything it started (package-notes §3.2, §3.3).

A worker runs in its own process group, so ``killpg`` (one atomic syscall) takes the worker
and every descendant that stayed in the group, including ones forked while we look. A psutil
snapshot, taken *before* the kill (killing first orphans the tree and hides it), catches
descendants that moved to another group. A ``setsid`` double-fork escapee is caught only
because the broker is a child subreaper: it reparents to the broker, which finds it among its
own non-worker children (:func:`orphans`) and kills it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal

import psutil

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of our workers reparent to this process, not to init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_CHILD_SUBREAPER failed (errno %d)", ctypes.get_errno())
        return False
    return True


def has_children(pid: int) -> bool:
    """Cheap check (~20 µs): does ``pid`` have any child? Spares psutil's /proc scan (2 ms)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                if f.read().strip():
                    return True
    except OSError:
        return False
    return False


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``, its process group and its descendants; return the descendants' pids.

    ``pid`` must be an unreaped child of ours, so it cannot have been reused (notes §3.3).
    The caller reaps ``pid``; descendants reparent to us (subreaper) and are reaped by
    :func:`reap_orphans`.
    """
    descendants: list[psutil.Process] = []
    if has_children(pid):
        try:
            descendants = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            descendants = []
    # ProcessLookupError: the group is already empty, or the worker had not yet called setpgid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil checks (pid, create_time): a reused pid is left alone
    return [proc.pid for proc in descendants]


def orphans(workers: set[int]) -> list[psutil.Process]:
    """Our children that are not workers: leftovers of killed worker trees."""
    try:
        return [p for p in psutil.Process().children() if p.pid not in workers]
    except psutil.Error:
        return []


def reap_orphans(workers: set[int]) -> int:
    """Kill and reap every non-worker child; return how many are still to be reaped."""
    left = 0
    for proc in orphans(workers):
        with contextlib.suppress(psutil.Error):
            proc.kill()
        try:
            # Only this pid: waitpid(-1) would steal the exit status of a worker (notes §3.2).
            reaped, _ = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if reaped == 0:
            left += 1
    return left
