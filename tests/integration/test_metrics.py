"""``[Server] MetricsAddress`` on a real broker: the scrape adds up to a known mix of
outcomes exactly, ``/health`` answers, and a missing prometheus-client stops the start."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pbt_server.client import BackgroundTaskCanceled, BackgroundTaskError, connect
from tests import codeunits as cu
from tests import ops_codeunits as ops
from tests import scrape
from tests.broker_process import REPO, BrokerProcess, write_ini
from tests.support import wait_until

METRICS = {"Server": {"MetricsAddress": "127.0.0.1:0"}}
MODULES = {"Codeunits": {"Modules": "tests.codeunits tests.ops_codeunits"}}


def operator_status(broker: BrokerProcess) -> dict[str, Any]:
    """The status through an operator's connection: it opens no session of its own."""
    with connect(str(broker.socket), operator=True) as session:
        return session.status()


def address(broker: BrokerProcess) -> str:
    metrics = operator_status(broker)["server"]["metrics"]
    assert isinstance(metrics, str)
    return metrics


def running(broker: BrokerProcess, codeunit: int, n: int) -> bool:
    """``n`` workers hold a task of ``codeunit`` (their clocks run)."""
    workers = operator_status(broker)["workers"]
    return sum(w["codeunit"] == codeunit and w["task_seconds"] is not None for w in workers) == n


def settled(broker: BrokerProcess) -> bool:
    totals = operator_status(broker)["totals"]
    return totals["workers"]["idle"] == 2 and totals["standby"] == "idle"


@pytest.fixture
def metrics_broker() -> Iterator[BrokerProcess]:
    broker = BrokerProcess.start(
        # CancelGrace 0: each cancel of a running task is a kill, counted the moment it happens
        {
            **METRICS,
            **MODULES,
            "Workers": {"Count": "2", "MaxMemoryMB": "100", "CancelGrace": "00:00:00"},
        }
    )
    try:
        yield broker
        assert broker.stop() == 0, broker.log_text()
    finally:
        broker.cleanup()


def test_the_scrape_adds_up_to_a_known_mix_of_outcomes(metrics_broker: BrokerProcess) -> None:
    broker = metrics_broker
    at = address(broker)
    a = connect(str(broker.socket))
    b = connect(str(broker.socket))
    try:
        p1 = a.open_page("Outcomes")
        for _ in range(7):
            assert p1.enqueue_background_task(cu.NOOP).result(timeout=10) == {}
        for code, codeunit, n, params, timeout in [
            ("ValueError", cu.RAISE, 3, None, None),
            ("CUST:Blocked", cu.CUSTOM_ERROR, 2, None, None),
            ("ChildSessionTaskTimeout", cu.SPIN, 1, None, 300),
            ("ChildSessionCrashed", cu.EXIT, 1, None, None),
            ("ChildSessionMemoryLimit", cu.ALLOCATE, 1, {"mb": "200", "seconds": "30"}, None),
        ]:
            for _ in range(n):
                task = p1.enqueue_background_task(codeunit, params, timeout=timeout)
                with pytest.raises(BackgroundTaskError) as caught:
                    task.result(timeout=30)
                assert caught.value.code == code
        # Both workers run a sleeper; what is enqueued now waits, and is cancelled waiting.
        p2 = a.open_page("Sleepers")
        sleepers = [p2.enqueue_background_task(cu.SLEEP, {"seconds": "60"}) for _ in range(2)]
        wait_until(lambda: running(broker, cu.SLEEP, 2), timeout=20)
        p3 = a.open_page("Record", record_id="R1")
        waiting = [p3.enqueue_background_task(cu.NOOP) for _ in range(3)]
        p3.set_record("R2")  # RecordChanged
        p4 = a.open_page("Closed")
        closed = [p4.enqueue_background_task(cu.NOOP) for _ in range(2)]
        p4.close()  # PageClosed
        for task in sleepers:
            assert task.cancel()  # Canceled, running: the worker is killed
        for task in waiting + closed + sleepers:
            with pytest.raises(BackgroundTaskCanceled):
                task.result(timeout=10)
        # Session b: two running sleepers and a waiting no-op, then the session closes.
        q = b.open_page("Session B")
        for _ in range(2):
            q.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
        wait_until(lambda: running(broker, cu.SLEEP, 2), timeout=20)
        q.enqueue_background_task(cu.NOOP)
    finally:
        b.close()  # SessionClosed x 3
    expected = {
        ("completed", "", cu.NOOP): 7,
        ("error", "ValueError", cu.RAISE): 3,
        ("error", "CUST:Blocked", cu.CUSTOM_ERROR): 2,
        ("error", "ChildSessionTaskTimeout", cu.SPIN): 1,
        ("error", "ChildSessionCrashed", cu.EXIT): 1,
        ("error", "ChildSessionMemoryLimit", cu.ALLOCATE): 1,
        ("cancelled", "RecordChanged", cu.NOOP): 3,
        ("cancelled", "PageClosed", cu.NOOP): 2,
        ("cancelled", "Canceled", cu.SLEEP): 2,
        ("cancelled", "SessionClosed", cu.SLEEP): 2,
        ("cancelled", "SessionClosed", cu.NOOP): 1,
    }
    try:
        wait_until(lambda: scrape.tasks_total(scrape.scrape(at)) == expected, timeout=20)
        wait_until(lambda: settled(broker), timeout=20)
        samples = scrape.scrape(at)
        # Every task that a worker started has a wait; only those that were not cancelled a run.
        started = {cu.NOOP: 7, cu.RAISE: 3, cu.CUSTOM_ERROR: 2, cu.SPIN: 1, cu.EXIT: 1}
        started |= {cu.ALLOCATE: 1}
        waits = scrape.by_label(samples, "pbt_task_wait_seconds_count", "codeunit")
        runs = scrape.by_label(samples, "pbt_task_run_seconds_count", "codeunit")
        assert waits == {str(c): n for c, n in (started | {cu.SLEEP: 4}).items()}
        assert runs == {str(c): n for c, n in (started | {cu.SLEEP: 0}).items()}
        assert scrape.value(samples, "pbt_task_run_seconds_sum", codeunit=str(cu.SPIN)) >= 0.3
        for label, count in runs.items():
            assert (
                scrape.value(samples, "pbt_task_run_seconds_bucket", codeunit=label, le="+Inf")
                == count
            )
        kills = scrape.by_label(samples, "pbt_worker_kills_total", "cause")
        assert kills == {
            "timeout": 1,
            "cancel": 4,  # two cancelled by id, two when session b closed
            "memory": 1,
            "no_ack": 0,
            "protocol": 0,
            "crash": 1,
            "recycle": 0,
            "leftovers": 0,
            "reload": 0,
            "boot_failure": 0,
        }
        assert scrape.value(samples, "pbt_sessions") == 1
        assert scrape.value(samples, "pbt_pages") == 3  # p1, p2, p3 (p4 closed)
        assert scrape.value(samples, "pbt_tasks_waiting") == 0
        assert scrape.value(samples, "pbt_tasks_running") == 0
        assert scrape.by_label(samples, "pbt_workers", "state") == {
            "booting": 0,
            "idle": 2,
            "starting": 0,
            "busy": 0,
            "down": 0,
        }
        assert scrape.value(samples, "pbt_standby_ready") == 1
        rss = scrape.by_label(samples, "pbt_worker_rss_bytes", "slot")
        assert set(rss) == {"0", "1", "standby"}
        assert all(v > 1 << 20 for v in rss.values())
        assert scrape.value(samples, "pbt_broker_rss_bytes") > 1 << 20
        assert scrape.value(samples, "pbt_up") == 1
        assert scrape.value(samples, "process_resident_memory_bytes") > 1 << 20
        assert scrape.get(at, "/health")[::2] == (200, "ok\n")
    finally:
        a.close()


def test_retired_workers_are_counted_by_cause(start_broker) -> None:
    broker = start_broker(
        {**METRICS, **MODULES, "Workers": {"Count": "1", "MaxTasksPerWorker": "3"}}
    )
    at = address(broker)
    with broker.connect() as session:
        page = session.open_page("P")
        for codeunit in [cu.NOOP] * 3 + [ops.LEAVE_ENVIRONMENT] + [cu.NOOP] * 3:
            assert page.enqueue_background_task(codeunit).result(timeout=10) == {}
    samples = scrape.scrape(at)
    kills = scrape.by_label(samples, "pbt_worker_kills_total", "cause")
    # 3 tasks: recycled; then one that leaves its mark: retired; then 3 more: recycled.
    assert (kills["recycle"], kills["leftovers"]) == (2, 1)
    assert sum(kills.values()) == 3
    assert scrape.tasks_total(samples) == {
        ("completed", "", cu.NOOP): 6,
        ("completed", "", ops.LEAVE_ENVIRONMENT): 1,
    }


def test_health_and_the_dashboard_files_are_served(start_broker) -> None:
    broker = start_broker(METRICS)
    at = address(broker)
    assert scrape.get(at, "/health") == (200, "text/plain", "ok\n")
    status, content_type, html = scrape.get(at, "/")
    assert (status, content_type) == (200, "text/html; charset=utf-8")
    assert '<script src="dashboard.js"' in html
    status, content_type, body = scrape.get(at, "/metrics")
    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    assert "pbt_tasks_total" in body
    assert scrape.get(at, "/nothing-here")[0] == 404
    # The status report says where the endpoint is; the log says so too.
    broker.wait_for_log(f"metrics, health and dashboard on http://{at}/")
    # Only the broker listens there: no worker inherited the socket.
    port = int(at.rsplit(":", 1)[1])

    def listening(pid: int) -> bool:
        return any(c.laddr and c.laddr.port == port for c in psutil.Process(pid).net_connections())

    assert listening(broker.pid)
    workers = [w["pid"] for w in operator_status(broker)["workers"]]
    assert len(workers) == 3  # two slots and the standby
    assert not any(listening(pid) for pid in workers)


def _ini(tmp_path: Path, metrics: str) -> Path:
    config = tmp_path / "server.ini"
    write_ini(
        config,
        {
            "Server": {
                "SocketPath": str(tmp_path / "pbt.sock"),
                "PidFile": str(tmp_path / "pbt.pid"),
                "LogFile": str(tmp_path / "pbt.log"),
                "MetricsAddress": metrics,
            },
            "Workers": {"Count": "1"},
            "Codeunits": {"Modules": "tests.codeunits"},
            "Database": {"Url": f"sqlite:///{tmp_path}/none.db"},
        },
    )
    return config


def _run(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbt_server", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_address_in_use_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(_ini(tmp_path, f"127.0.0.1:{port}"))
    assert result.returncode == 1, result.stderr
    assert f"[Server] MetricsAddress 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not (tmp_path / "pbt.sock").exists()  # it failed before listening or forking


def test_without_prometheus_client_the_start_fails_naming_the_extra(tmp_path: Path) -> None:
    # A prometheus_client that cannot be imported, ahead of the installed one on sys.path.
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "prometheus_client.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'prometheus_client'\","
        " name='prometheus_client')\n"
    )
    result = _run(
        _ini(tmp_path, "127.0.0.1:0"),
        env={"PYTHONPATH": f"{hidden}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    assert (
        "[Server] MetricsAddress needs the prometheus-client package:"
        " pip install 'pbt-server[metrics]'" in result.stderr
    )
    assert not (tmp_path / "pbt.sock").exists()  # it never listened
