"""Running the broker as a daemon: the pid file, ``start`` and ``stop``.

``start`` does not fork by hand. It launches ``python -m pbt_server run --daemon`` in a new
session (no controlling terminal, stdio on the log file), then waits until that process either
exits (failure: show the end of the log) or answers a ``ping`` on the socket (success). The
process it launched *is* the broker, so the pid it reports is the pid in the pid file.

A pid file names a running pbt-server only if that pid is alive *and* its command line is a
pbt-server's. Anything else (a dead pid, a pid the kernel reused for another program, garbage)
is stale and gets replaced. No signal is ever sent to a pid that fails this check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pbt_server.errors import PbtError

if TYPE_CHECKING:
    from pbt_server.config import ServerConfig

log = logging.getLogger(__name__)

POLL_SECONDS = 0.02
"""Step of every wait loop here: short enough to feel instant, long enough not to spin."""
LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 64 * 1024
_PROGRAM_NAMES = frozenset({"pbt_server", "pbt-server"})

# Handles of daemons this process started. A daemon outlives `start`, but while this process
# lives the daemon is still its child: keeping the handle lets us reap it (no zombie) and
# avoids the ResourceWarning a collected handle of a running child raises.
_launched: list[subprocess.Popen[bytes]] = []


class AlreadyRunning(PbtError):
    """Another pbt-server holds the pid file; ``.pid`` is its process id."""

    code = "AlreadyRunning"

    def __init__(self, text: str = "", *, code: str | None = None, pid: int = 0) -> None:
        super().__init__(text or f"pbt-server is already running (pid {pid})", code=code)
        self.pid = pid


def is_pbt_server(pid: int) -> bool:
    """True if ``pid`` is a live process whose command line runs pbt-server."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # gone, or not ours to inspect: either way not a server we may signal
        return False
    # A zombie has an empty command line: it is dead for our purposes. Matching whole
    # arguments, not substrings, keeps a checkout in a directory named "pbt-server" from
    # making every Python process in its venv look like a server.
    return any(_names_program(arg) for arg in argv if arg)


def _names_program(arg: str) -> bool:
    # `python -m pbt_server ...`, the `pbt-server` console script, `-m pbt_server.cli`.
    return os.path.basename(arg) in _PROGRAM_NAMES or arg.startswith("pbt_server.")


class Pidfile:
    """The file that names the running broker's pid.

    Created atomically (a reader never sees a half-written file) and removed on exit only
    by the process whose pid it holds, so a forked worker unwinding cannot remove it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self) -> int | None:
        """Return the pid in the file, or None if the file is missing or not a pid."""
        try:
            text = self.path.read_bytes().decode("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if pid > 0 else None

    def running_pid(self) -> int | None:
        """Return the pid in the file if it is a live pbt-server, else None."""
        pid = self.read()
        return pid if pid is not None and is_pbt_server(pid) else None

    def acquire(self) -> int | None:
        """Write this process's pid to the file.

        Returns:
            The pid of a stale pid file that was replaced, or None (no file, or garbage).

        Raises:
            AlreadyRunning: the file names another live pbt-server.
        """
        me = os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{me}\n")
            return self._link(tmp, me)
        finally:
            os.unlink(tmp)

    def _link(self, tmp: str, me: int) -> int | None:
        stale: int | None = None
        for _ in range(3):
            try:
                os.link(tmp, self.path)  # fails if the name exists: no check-then-write race
                return stale
            except FileExistsError:
                pass
            holder = self.read()
            if holder == me:
                return None
            if holder is not None and is_pbt_server(holder):
                raise AlreadyRunning(pid=holder)
            if holder is None:
                log.warning("Replacing unreadable pid file %s", self.path)
            else:
                log.warning(
                    "Replacing stale pid file %s (pid %d is not a pbt-server)", self.path, holder
                )
                stale = holder
            # Two starters replacing the same stale file in the same instant can both get
            # past this unlink; like gunicorn's pid file we accept that narrow window.
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        holder = self.read() or 0
        raise AlreadyRunning(f"pid file {self.path} keeps being re-created", pid=holder)

    def release(self) -> None:
        """Remove the file if it still holds this process's pid."""
        self.remove_if_holds(os.getpid())

    def remove_if_holds(self, pid: int) -> bool:
        """Remove the file if it holds ``pid``; return whether it was removed."""
        if self.read() != pid:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return True


def start_daemon(config_path: Path | None, config: ServerConfig, *, timeout: float = 30.0) -> int:
    """Start the broker in the background; return once it answers on its socket.

    Args:
        config_path: the ini file the daemon should load (None: built-in defaults).
        config: that file, already loaded, for the socket and log paths.
        timeout: seconds to wait for the first ``ping`` answer.

    Returns:
        0 when the daemon answers, 1 if it exited or did not answer in time (then it is
        stopped and the end of its log is printed to stderr).
    """
    _reap_launched()
    cmd = [sys.executable, "-m", "pbt_server", "run", "--daemon"]
    if config_path is not None:
        cmd += ["--config", str(Path(config_path).resolve())]
    log_file = config.server.log_file
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "rb") as devnull, log_file.open("ab") as out:
        log_offset = out.tell()
        proc = subprocess.Popen(
            cmd, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _launched.append(proc)

    socket_path = config.server.socket_path
    deadline = time.monotonic() + timeout
    while (code := proc.poll()) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _abandon(proc)
            _report_failure(
                f"pbt-server did not answer on {socket_path} within {timeout:g} s and was "
                f"stopped (pid {proc.pid})",
                log_file,
                log_offset,
            )
            return 1
        if socket_path.exists() and _answers_ping(socket_path, min(remaining, 2.0)):
            print(f"pbt-server started (pid {proc.pid}), listening on {socket_path}")
            return 0
        time.sleep(POLL_SECONDS)
    _report_failure(f"pbt-server failed to start ({_describe_exit(code)})", log_file, log_offset)
    return 1


def stop_daemon(config: ServerConfig, *, timeout: float = 30.0) -> int:
    """Stop the running broker with SIGTERM and wait until its process is gone.

    Returns:
        0 when it stopped, and also when it was not running (nothing to do; a stale pid
        file is then removed). 1 if it could not be signalled or outlived ``timeout``.
    """
    _reap_launched()
    pidfile = Pidfile(config.server.pid_file)
    pid = pidfile.read()
    if pid is None or not is_pbt_server(pid):
        if pid is not None and pidfile.remove_if_holds(pid):
            print(f"pbt-server is not running (removed stale pid file {pidfile.path}, pid {pid})")
        else:
            print("pbt-server is not running")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it exited between the check and the signal: already what we want
    except PermissionError as err:
        print(f"pbt-server: cannot stop pid {pid}: {err.strerror}", file=sys.stderr)
        return 1
    if not _wait_until_gone(pid, timeout):
        print(
            f"pbt-server (pid {pid}) did not stop within {timeout:g} s; it is still running",
            file=sys.stderr,
        )
        return 1
    # A broker killed hard leaves its pid file behind; it names a dead pid now.
    pidfile.remove_if_holds(pid)
    print(f"pbt-server stopped (pid {pid})")
    return 0


def _wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap_launched()
        if not is_pbt_server(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _answers_ping(socket_path: Path, timeout: float) -> bool:
    from pbt_server.client import connect  # lazy: keeps `pbt-server --version` fast

    try:
        with connect(str(socket_path), timeout=timeout) as session:
            session.ping()
    except (PbtError, OSError):
        return False  # not listening yet (or not answering yet): keep polling
    return True


def _abandon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _reap_launched() -> None:
    _launched[:] = [proc for proc in _launched if proc.poll() is None]


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _report_failure(headline: str, log_file: Path, offset: int) -> None:
    lines = _log_tail(log_file, offset)
    if not lines:
        print(f"{headline}; nothing was written to {log_file}", file=sys.stderr)
        return
    print(f"{headline}; last lines of {log_file}:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


def _log_tail(path: Path, offset: int) -> list[str]:
    """The last lines written to ``path`` after ``offset`` (this start attempt's output)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = offset if offset <= size else 0  # truncated or rotated meanwhile
            f.seek(max(start, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
