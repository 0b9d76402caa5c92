"""Killing a worker and everything it started; what a worker inherits of the broker's fds.

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
import select
import signal
import stat

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

    psutil's ``children()`` scans all of /proc (~2 ms); this is cheap enough for the event
    loop. Falls back to psutil where the kernel lacks the file.
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
    (a pid held by a zombie or a live group cannot be reused). The caller reaps
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
            # Only this pid: waitpid(-1) would steal the exit status of a worker, which
            # multiprocessing must reap itself (one reaper per child).
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if reaped == 0:
            left += 1
    return left


def shared_fds() -> set[int]:
    """This process's sockets and anonymous-inode fds (epoll, eventfd, pidfd, timerfd...):
    what a forked worker must not keep of the broker's, unless a codeunit module opened it."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode) or os.readlink(f"/proc/self/fd/{fd}").startswith(
                "anon_inode:"
            ):
                found.add(fd)
        except OSError:
            continue
    return found


def describe_exit(code: int | None) -> str:
    """Say how a process ended: ``exited with code 3`` or ``killed by SIGSEGV``."""
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (possibly out of memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def kill_leftovers(variable: str, prefix: str) -> list[int]:
    """Kill every process of ours whose environment has ``variable`` starting with
    ``prefix``; return their pids.

    Workers die with a SIGKILLed broker (their death signal), but what their codeunits
    started is reparented to init and would run on. Every worker marks its environment with
    the broker's identity, and so does everything it starts that keeps the environment; the
    next start of the same server (the same pid file, whose lock it now holds, so no live
    server can own them) finds and kills them. Processes of other users cannot be read and
    are never touched.
    """
    me = os.getpid()
    needle = f"{variable}={prefix}".encode()
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            # Still alive after the read: the environment was that process's own (a live
            # process's pid cannot have been reused), and the pidfd signals only it.
            if not select.select([pidfd], [], [], 0)[0] and any(
                entry.startswith(needle) for entry in environ.split(b"\0")
            ):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                found.append(pid)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return found
