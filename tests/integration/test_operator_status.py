"""``pbt-server status --json`` and ``pbt-server health`` on a full server: the operator's
connection is not a session, so ``MaxConnections`` sessions cannot lock the operator out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pbt_server.client import connect
from pbt_server.errors import ServerBusy
from tests import codeunits as cu
from tests import scrape
from tests.broker_process import REPO, BrokerProcess
from tests.support import wait_until

# The documented fields of `status --json` (README, "Operating it"): exactly these.
SERVER_FIELDS = {"pid", "version", "uptime", "socket", "tcp", "metrics", "max_sessions"}
TOTALS_FIELDS = {
    "sessions",
    "pages",
    "waiting",
    "running",
    "workers",
    "standby",
    "worker_ends",
    "shared",
    "cache",
}
SESSION_FIELDS = {"id", "pages", "waiting", "running", "context"}
WORKER_FIELDS = {"slot", "pid", "state", "rss", "tasks_done", "task", "codeunit", "task_seconds"}


def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbt_server", *args, "--config", str(broker.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_and_health_answer_when_the_server_is_at_max_connections(start_broker) -> None:
    broker = start_broker(
        {
            "Server": {"MaxConnections": "2", "MetricsAddress": "127.0.0.1:0"},
            "Workers": {"Count": "2"},
        }
    )
    first = connect(str(broker.socket), context={"user": "alice"})
    second = connect(str(broker.socket))
    try:
        page = first.open_page("Busy")
        page.enqueue_background_task(cu.SLEEP, {"seconds": "60"})
        page.enqueue_background_task(cu.NOOP)
        page.enqueue_background_task(cu.NOOP)
        second.open_page("Idle")
        with pytest.raises(ServerBusy):  # the server is full
            connect(str(broker.socket)).close()

        def busy_report() -> dict | None:
            result = cli(broker, "status", "--json")
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            # The sleeper has started; the no-ops ran on the other worker, or wait behind it.
            sleeper = [w for w in report["workers"] if w["codeunit"] == cu.SLEEP]
            return report if sleeper and sleeper[0]["task_seconds"] is not None else None

        report = wait_until(busy_report, timeout=30)
        assert set(report) == {"server", "totals", "sessions", "workers"}
        assert set(report["server"]) == SERVER_FIELDS
        assert report["server"]["pid"] == broker.pid
        assert report["server"]["max_sessions"] == 2
        assert report["server"]["socket"] == str(broker.socket)
        assert report["server"]["tcp"] is None
        assert report["server"]["metrics"].startswith("127.0.0.1:")
        sessions = {s["id"]: s for s in report["sessions"]}
        assert set(sessions) == {first.id, second.id}
        for session in sessions.values():
            assert set(session) == SESSION_FIELDS
        assert sessions[first.id]["context"] == {"user": "alice"}
        assert sessions[first.id]["running"] >= 1
        assert set(report["totals"]) == TOTALS_FIELDS
        totals = report["totals"]
        assert totals["sessions"] == 2
        assert totals["pages"] == 2
        assert totals["waiting"] == sum(s["waiting"] for s in report["sessions"])
        assert totals["running"] == sum(s["running"] for s in report["sessions"])
        assert set(totals["workers"]) == {"booting", "idle", "starting", "busy", "down"}
        assert sum(totals["workers"].values()) == 2
        assert totals["workers"]["busy"] >= 1
        assert totals["standby"] in ("idle", "booting")
        for worker in report["workers"]:
            assert set(worker) == WORKER_FIELDS
        sleeper = next(w for w in report["workers"] if w["codeunit"] == cu.SLEEP)
        assert sleeper["state"] == "busy"
        assert sleeper["task"] == f"s{first.id}/t1"
        assert sleeper["task_seconds"] >= 0
        assert sleeper["rss"] > 1 << 20

        text = cli(broker, "status")
        assert text.returncode == 0, text.stderr
        assert "2 sessions (2 pages)" in text.stdout
        health = cli(broker, "health")
        assert (health.returncode, health.stdout) == (0, "healthy\n")
        # The HTTP endpoint is not a connection at all.
        samples = scrape.scrape(report["server"]["metrics"])
        assert scrape.value(samples, "pbt_sessions") == 2
        assert scrape.value(samples, "pbt_sessions_max") == 2
        assert scrape.get(report["server"]["metrics"], "/health")[::2] == (200, "ok\n")
    finally:
        first.close()
        second.close()


def test_health_fails_when_nothing_answers(start_broker) -> None:
    broker = start_broker()
    assert broker.stop() == 0
    result = cli(broker, "health")
    assert result.returncode == 1
    assert result.stdout.startswith(f"unhealthy: no answer on {broker.socket}")


def test_status_and_health_answer_when_the_report_outgrows_a_sessions_frame(
    start_broker,
) -> None:
    """300 sessions with 4 KB of context each: a report over the 1 MiB a session's frame
    holds still reaches the operator."""
    import asyncio

    from pbt_server.client import aio

    broker = start_broker()

    async def scenario() -> tuple[subprocess.CompletedProcess[str], ...]:
        context = {"blob": "x" * 4000}
        sessions = [await aio.connect(str(broker.socket), context=context) for _ in range(300)]
        try:
            status = await asyncio.to_thread(cli, broker, "status", "--json")
            health = await asyncio.to_thread(cli, broker, "health")
            return status, health
        finally:
            for session in sessions:
                await session.close()

    status, health = asyncio.run(scenario())
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert len(report["sessions"]) == 300
    assert len(status.stdout) > 1 << 20
    assert health.returncode == 0, health.stdout
