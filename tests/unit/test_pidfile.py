"""The pid file and the daemon's start/stop bookkeeping, with real files and real pids."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pbt_server import __version__, cli
from pbt_server.daemon import AlreadyRunning, Pidfile, start_daemon, stop_daemon

if TYPE_CHECKING:
    from pbt_server.config import ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
# Long-lived children say "ready" first: until a child has finished exec, its
# /proc/<pid>/cmdline can still be empty, so it would not look like a pbt-server yet.
SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"
# A "server": it locks the pid file named by its argument, writes its pid, says ready.
HOLDER = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
    " fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'%d\\n' % os.getpid());"
    " print('ready', flush=True); time.sleep(60)"
)
# A "server" that will not stop: it ignores SIGTERM before it says ready.
STUBBORN = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + HOLDER.replace(
    "; ", "\n"
)

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``python -c CODE *extra`` and wait for its "ready"; all are killed and reaped after.

    An ``extra`` argument ``"pbt_server"`` makes the process look like a pbt-server.
    """
    procs: list[subprocess.Popen[str]] = []

    def _spawn(code: str = SLEEPER, *extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *extra], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"  # blocks only until the child prints it
        return proc

    yield _spawn
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        assert proc.wait(timeout=30) == 0
    return proc.pid


@pytest.fixture
def pidfile(tmp_path: Path) -> Pidfile:
    return Pidfile(tmp_path / "var" / "pbt-server.pid")


def _write(pidfile: Pidfile, text: str) -> None:
    pidfile.path.parent.mkdir(parents=True, exist_ok=True)
    pidfile.path.write_text(text)


# --- Pidfile -----------------------------------------------------------------------------


def hold(spawn: Spawn, pidfile: Pidfile, code: str = HOLDER) -> subprocess.Popen[str]:
    """A process that holds ``pidfile``'s lock, as a running server does."""
    pidfile.path.parent.mkdir(parents=True, exist_ok=True)
    return spawn(code, str(pidfile.path))


def test_acquire_locks_writes_our_pid_and_release_removes_it(pidfile: Pidfile) -> None:
    assert pidfile.acquire() is None
    assert pidfile.path.read_text() == f"{os.getpid()}\n"
    assert pidfile.read() == os.getpid()
    assert pidfile.locked()
    assert os.listdir(pidfile.path.parent) == [pidfile.path.name]  # no temp file left over

    pidfile.release()
    assert not pidfile.path.exists()
    assert not pidfile.locked()
    pidfile.release()  # already released: nothing to do


def test_a_live_server_holding_the_lock_raises_already_running(
    pidfile: Pidfile, spawn: Spawn
) -> None:
    server = hold(spawn, pidfile)

    with pytest.raises(AlreadyRunning) as info:
        pidfile.acquire()

    assert info.value.pid == server.pid
    assert info.value.code == "AlreadyRunning"
    assert pidfile.read() == server.pid  # untouched
    assert pidfile.running_pid() == server.pid


def test_a_dead_servers_file_is_stale_and_replaced(
    pidfile: Pidfile, dead_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    _write(pidfile, f"{dead_pid}\n")
    assert pidfile.running_pid() is None

    assert pidfile.acquire() == dead_pid

    assert pidfile.read() == os.getpid()
    assert f"pid {dead_pid} is not running it" in caplog.text


def test_a_file_naming_an_unrelated_live_process_is_stale(pidfile: Pidfile, spawn: Spawn) -> None:
    # e.g. `tail -f pbt_server.log` got the dead server's pid: it holds no lock.
    other = spawn(SLEEPER, "pbt_server")  # even one whose command line looks like ours
    _write(pidfile, f"{other.pid}\n")
    assert pidfile.running_pid() is None

    assert pidfile.acquire() == other.pid

    assert pidfile.read() == os.getpid()
    assert other.poll() is None  # stale detection never signals anyone


@pytest.mark.parametrize("content", ["", "garbage\n", "-5\n", "0\n", "12 34\n", "\xff\xfe"])
def test_garbage_reads_as_none_and_is_replaced(pidfile: Pidfile, content: str) -> None:
    _write(pidfile, content)
    assert pidfile.read() is None
    assert pidfile.running_pid() is None

    assert pidfile.acquire() is None

    assert pidfile.read() == os.getpid()


def test_missing_file_reads_as_none(pidfile: Pidfile) -> None:
    assert pidfile.read() is None
    assert pidfile.running_pid() is None


def test_a_symlinked_pid_file_is_refused(pidfile: Pidfile, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    pidfile.path.parent.mkdir(parents=True, exist_ok=True)
    pidfile.path.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        pidfile.acquire()
    assert target.read_text() == "precious\n"


# --- stop_daemon / start_daemon ----------------------------------------------------------


def _config_file(tmp_path: Path, name: str = "server.ini", extra: str = "") -> Path:
    ini = tmp_path / name
    ini.write_text(f"[Server]\nPidFile = var/pbt.pid\nLogFile = var/pbt.log\n{extra}")
    return ini


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return _config_file(tmp_path)


def _load(path: Path, tmp_path: Path) -> ServerConfig:
    from pbt_server.config import load_config

    return load_config(path, environ={}, base_dir=tmp_path)


def test_stop_sends_sigterm_and_waits_until_the_server_is_gone(
    tmp_path: Path, config_file: Path, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _load(config_file, tmp_path)
    server = hold(spawn, Pidfile(config.server.pid_file))

    assert stop_daemon(config, timeout=10.0) == 0

    assert server.wait(timeout=10) == -15  # SIGTERM, identity of the process asserted
    assert f"pbt-server stopped (pid {server.pid})" in capsys.readouterr().out
    assert not config.server.pid_file.exists()  # it died without removing it; stop did


def test_stop_gives_up_after_the_timeout(
    tmp_path: Path, config_file: Path, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _load(config_file, tmp_path)
    server = hold(spawn, Pidfile(config.server.pid_file), STUBBORN)  # ignores SIGTERM

    assert stop_daemon(config, timeout=0.1) == 1

    assert server.poll() is None
    assert f"pbt-server (pid {server.pid}) did not stop" in capsys.readouterr().err
    assert Pidfile(config.server.pid_file).read() == server.pid


def test_stop_with_stale_pid_file_signals_nobody_and_removes_it(
    tmp_path: Path, config_file: Path, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _load(config_file, tmp_path)
    bystander = spawn(SLEEPER, "pbt_server")  # alive, looks like ours, holds no lock
    _write(Pidfile(config.server.pid_file), f"{bystander.pid}\n")

    assert stop_daemon(config) == 0

    assert bystander.poll() is None
    out = capsys.readouterr().out
    assert "pbt-server is not running" in out
    assert "stale pid file" in out
    assert not config.server.pid_file.exists()


def test_stop_without_pid_file_has_nothing_to_do(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stop_daemon(_load(config_file, tmp_path)) == 0
    assert capsys.readouterr().out == "pbt-server is not running\n"


def test_start_reports_a_daemon_that_exits_with_the_end_of_its_log(
    tmp_path: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The parent's config is fine; the file the daemon reads is not, so `run` exits with 2.
    config = _load(config_file, tmp_path)
    bad = _config_file(tmp_path, "bad.ini", "[Workers]\nCount = four\n")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))

    assert start_daemon(bad, config, timeout=30.0) == 1

    err = capsys.readouterr().err
    assert (
        f"pbt-server failed to start (exited with code 2); last lines of"
        f" {config.server.log_file}:" in err
    )
    assert "Count = 'four'" in err
    assert not config.server.pid_file.exists()


# --- cli ---------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pbt-server {__version__}\n"


def test_version_through_python_dash_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pbt_server", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"pbt-server {__version__}\n")


def test_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_run_with_bad_config_prints_why_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[Workers]\nCount = four\n")

    assert cli.main(["run", "--config", str(bad)]) == 2

    err = capsys.readouterr().err
    assert str(bad) in err
    assert "[Workers] Count = 'four'" in err


def test_run_refuses_when_a_pbt_server_holds_the_pid_file(
    tmp_path: Path,
    config_file: Path,
    spawn: Spawn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in the ini resolve against the cwd
    server = hold(spawn, Pidfile(tmp_path / "var" / "pbt.pid"))

    assert cli.main(["run", "--config", str(config_file)]) == 1
    assert cli.main(["start", "--config", str(config_file)]) == 1

    err = capsys.readouterr().err
    assert err.count(f"pbt-server is already running (pid {server.pid})") == 2


def test_format_status() -> None:
    report = {
        "server": {
            "pid": 4242,
            "version": "0.1.0",
            "uptime": 93784.5,
            "socket": "/srv/var/pbt.sock",
            "tcp": None,
        },
        "sessions": [{"id": 1, "pages": 2, "waiting": 10, "running": 5}],
        "workers": [
            {
                "slot": 0,
                "pid": 4243,
                "state": "busy",
                "rss": 25 * 1024 * 1024 + 104858,
                "tasks_done": 12,
                "task": "50100 (session 1, task 7)",
            },
            {"slot": 1, "pid": None, "state": "starting", "rss": 0, "tasks_done": 0, "task": None},
        ],
    }
    text = cli.format_status(report)
    assert text.splitlines()[0] == (
        "pbt-server 0.1.0  pid 4242  up 1d 02:03:04  socket /srv/var/pbt.sock  tcp off"
    )
    assert "  id  pages  waiting  running\n   1      2       10        5" in text
    assert "     0  4243  busy         25.1          12  50100 (session 1, task 7)" in text
    assert "     1     -  starting      0.0           0  -" in text
    empty = cli.format_status({**report, "sessions": []})
    assert "sessions:\n  no sessions\n" in empty
