"""Killing a worker and everything it started (package-notes §3.2, §3.3).

A worker runs in its own process group, so ``killpg`` (one atomic syscall) takes the worker
and every descendant that stayed in the group, including ones forked while we look. A psutil
snapshot, taken *before* the kill (killing first orphans the tree and hides it), catches
descendants that moved to another group. A ``setsid`` double-fork escapee is caught only
because the broker is a child subreaper: it reparents to the broker, which finds it among its
own non-worker children (:func:`reap_orphans`) and kills it.
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


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from ``/proc/<pid>/task/*/children`` (~20 µs).

    psutil's ``children()`` scans all of /proc (~2 ms, package-notes §3.1); this is cheap
    enough for the event loop. Falls back to psutil where the kernel lacks the file.
    """
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended while we looked
            try:  # no CONFIG_PROC_CHILDREN
                return [p.pid for p in psutil.Process(pid).children()]
            except psutil.Error:
                return []
        except OSError:
            continue
    return found


def kill_tree(pid: int, pidfd: int) -> list[int]:
    """SIGKILL the worker ``pid``, its process group and its descendants.

    Returns the descendants' pids. The worker is signalled through its pidfd, which names
    that very process even if multiprocessing reaped it behind our back (``Process.start``
    polls every child); only while it is unreaped do we also trust its pid as a group id
    (a pid held by a zombie or a live group cannot be reused, notes §3.3). The caller reaps
    the worker; descendants reparent to us (subreaper) and :func:`reap_orphans` reaps them.
    """
    descendants: list[psutil.Process] = []
    if children(pid):
        try:
            descendants = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            descendants = []
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return []  # already reaped: its pid may be anyone's now; the sweep finds leftovers
    # ProcessLookupError: the group is already empty, or the worker had not yet called setpgid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for proc in descendants:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil checks (pid, create_time): a reused pid is left alone
    return [proc.pid for proc in descendants]


def reap_orphans(workers: set[int]) -> int:
    """Kill and reap every child of ours that is not a worker; return how many remain.

    Such a child can only be a leftover of a worker's tree, reparented to us (we are its
    subreaper). It is unreaped, so its pid cannot have been reused: a plain kill is safe.
    """
    left = 0
    for pid in children(os.getpid()):
        if pid in workers:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        try:
            # Only this pid: waitpid(-1) would steal the exit status of a worker (notes §3.2).
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if reaped == 0:
            left += 1
    return left
