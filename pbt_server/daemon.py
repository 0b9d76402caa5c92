"""Running the broker as a daemon: the pid file, ``start`` and ``stop``.

``start`` does not fork by hand. It launches ``python -m pbt_server run --daemon`` in a new
session (no controlling terminal, stdio on the log file), then waits until that process either
exits (failure: show the end of the log) or answers a ``ping`` on the socket (success). The
process it launched *is* the broker, so the pid it reports is the pid in the pid file.

The pid file is **locked** (``flock``) by the running server for as long as it runs, the way
PostgreSQL's postmaster holds its lock file: a pid file names a running pbt-server only while
its lock is held. A file left by a server that died, or naming any other process (say a
``tail -f`` that got the dead server's pid), is stale and replaced; no signal is ever sent to
a pid whose file is not locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
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

# Handles of daemons this process started. A daemon outlives `start`, but while this process
# lives the daemon is still its child: keeping the handle lets us reap it (no zombie) and
# avoids the ResourceWarning a collected handle of a running child raises.
_launched: list[subprocess.Popen[bytes]] = []


class AlreadyRunning(PbtError):
    """Another pbt-server holds the pid file; ``.pid`` is its process id."""

    code = "AlreadyRunning"
    sent = False

    def __init__(self, text: str = "", *, code: str | None = None, pid: int = 0) -> None:
        super().__init__(text or f"pbt-server is already running (pid {pid})", code=code)
        self.pid = pid


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise OSError(
                err.errno, f"pid file {path} is a symbolic link; not following it"
            ) from err
        raise


class Pidfile:
    """The file that names the running broker's pid, locked while that broker runs."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None  # open and locked while we hold it

    def fileno(self) -> int | None:
        """The locked file's descriptor while we hold it (workers must not inherit it)."""
        return self._fd

    def read(self) -> int | None:
        """Return the pid in the file, or None if the file is missing or not a pid."""
        try:
            text = self.path.read_bytes().decode("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if pid > 0 else None

    def locked(self) -> bool:
        """True while some process holds the file's lock: a server runs."""
        if self._fd is not None:
            return True
        try:
            fd = _open_nofollow(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return False

    def running_pid(self) -> int | None:
        """Return the pid of the server holding the file, or None if none does."""
        return self.read() if self.locked() else None

    def acquire(self) -> int | None:
        """Lock the file and write this process's pid into it; hold it until :meth:`release`.

        Returns:
            The pid a stale file named (replaced now), or None.

        Raises:
            AlreadyRunning: another live server holds the file's lock.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(pid=self.read() or 0) from None
        stale = self.read()
        if stale is not None:
            log.warning("Replacing stale pid file %s (pid %d is not running it)", self.path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return stale

    def release(self) -> None:
        """Remove the file and drop its lock, if this process holds it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.read() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(fd)

    def remove_stale(self) -> int | None:
        """Remove the file if no server holds it; return the pid it named."""
        if self.locked():
            return None
        pid = self.read()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return pid


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
    from pbt_server.proctree import describe_exit

    _report_failure(f"pbt-server failed to start ({describe_exit(code)})", log_file, log_offset)
    return 1


def stop_daemon(config: ServerConfig, *, timeout: float = 30.0) -> int:
    """Stop the running broker with SIGTERM and wait until it has released its pid file.

    Returns:
        0 when it stopped, and also when it was not running (nothing to do; a stale pid
        file is then removed). 1 if it could not be signalled or outlived ``timeout``.
    """
    _reap_launched()
    pidfile = Pidfile(config.server.pid_file)
    pid = pidfile.running_pid()
    if pid is None:
        stale = pidfile.remove_stale()
        if stale is not None:
            print(f"pbt-server is not running (removed stale pid file {pidfile.path}, pid {stale})")
        else:
            print("pbt-server is not running")
        return 0
    try:
        # A pidfd names that very process: checking the lock after opening it closes the
        # window in which the server could exit and its pid be reused.
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None  # it exited between the check and now: already what we want
    if pidfd is not None:
        try:
            if pidfile.running_pid() == pid:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError as err:
            print(f"pbt-server: cannot stop pid {pid}: {err.strerror}", file=sys.stderr)
            return 1
        finally:
            os.close(pidfd)
    if not _wait_until_released(pidfile, timeout):
        print(
            f"pbt-server (pid {pid}) did not stop within {timeout:g} s; it is still running",
            file=sys.stderr,
        )
        return 1
    pidfile.remove_stale()  # a broker killed hard leaves its file behind, unlocked
    print(f"pbt-server stopped (pid {pid})")
    return 0


def _wait_until_released(pidfile: Pidfile, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap_launched()
        if not pidfile.locked():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _answers_ping(socket_path: Path, timeout: float) -> bool:
    from pbt_server.client import connect  # lazy: keeps `pbt-server --version` fast

    try:
        with connect(str(socket_path), timeout=timeout, operator=True) as session:
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
