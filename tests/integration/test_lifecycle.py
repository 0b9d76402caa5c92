"""Graceful stop and the real command line: start, status, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from pbt_server.client import BackgroundTaskCanceled, ConnectionLost
from tests import codeunits as cu
from tests.broker_process import REPO, BrokerProcess
from tests.support import wait_until


def test_graceful_stop_cancels_tasks_and_tells_clients(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    workers = broker.worker_pids()
    session = broker.connect()
    page = session.open_page("P")
    running = page.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
    waiting = page.enqueue_background_task(cu.NOOP)
    wait_until(lambda: broker.status()["workers"][0]["task"] is not None)
    assert broker.stop() == 0
    for task in (running, waiting):
        with pytest.raises(BackgroundTaskCanceled) as caught:
            task.result(timeout=5)
        assert caught.value.code == "ServerShuttingDown"
    wait_until(lambda: session.closed)
    with pytest.raises(ConnectionLost):
        session.ping()
    session.close()
    assert not broker.socket.exists()
    assert not any(psutil.pid_exists(pid) for pid in workers)
    log = broker.log_text()
    assert "stopping: SIGTERM received" in log
    assert "tasks since the last summary: 2 cancelled (ServerShuttingDown 2)" in log


def _cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbt_server", *args, "--config", str(broker.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def stopped_broker():
    """A configured broker directory with no broker running (the CLI starts it)."""
    broker = BrokerProcess.start()
    assert broker.stop() == 0
    broker.process = None
    yield broker
    pid = None
    if (broker.directory / "pbt.pid").exists():
        pid = int((broker.directory / "pbt.pid").read_text())
    if pid and psutil.pid_exists(pid):
        os.kill(pid, signal.SIGKILL)
    broker.cleanup()


def test_cli_start_status_stop(stopped_broker):
    broker = stopped_broker
    started = _cli(broker, "start")
    assert started.returncode == 0, started.stderr
    pid = int((broker.directory / "pbt.pid").read_text())
    assert f"pbt-server started (pid {pid})" in started.stdout
    # the daemon serves tasks
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=10) == {"a": "b"}
        page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        wait_until(lambda: any(w["task"] for w in broker.status()["workers"]))
        status = _cli(broker, "status")
        assert status.returncode == 0, status.stderr
        assert f"pid {pid}" in status.stdout
        workers = [w["pid"] for w in broker.status()["workers"]]
        for worker in workers:
            assert str(worker) in status.stdout
        again = _cli(broker, "start")
        assert again.returncode == 1
        assert f"already running (pid {pid})" in again.stderr
    stopped = _cli(broker, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pbt-server stopped (pid {pid})" in stopped.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not broker.socket.exists()
    assert not (broker.directory / "pbt.pid").exists()
    wait_until(lambda: not any(psutil.pid_exists(w) for w in workers))
    assert _cli(broker, "status").returncode == 1


def test_cli_start_replaces_a_stale_pid_file(stopped_broker):
    broker = stopped_broker
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (broker.directory / "pbt.pid").write_text(f"{dead.pid}\n")
    started = _cli(broker, "start")
    assert started.returncode == 0, started.stderr
    assert "stale" in started.stdout
    assert _cli(broker, "stop").returncode == 0


def test_cli_start_reports_why_it_failed(stopped_broker):
    broker = stopped_broker
    (broker.directory / "test.db").unlink()
    failed = _cli(broker, "start")
    assert failed.returncode == 1
    assert "failed to start" in failed.stderr
    assert "does not exist" in failed.stderr
    assert not (broker.directory / "pbt.pid").exists()


def test_bad_config_names_file_section_key_and_value(stopped_broker):
    broker = stopped_broker
    bad = broker.directory / "bad.ini"
    bad.write_text("[Workers]\nCount = four\n")
    result = subprocess.run(
        [sys.executable, "-m", "pbt_server", "run", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{bad}: [Workers] Count = 'four'" in result.stderr
