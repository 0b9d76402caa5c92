"""Reload: ``pbt-server reload``, SIGHUP and ``run --reload`` take new code and settings
without losing a session, a page or a task."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pbt_server.client import aio
from pbt_server.errors import BackgroundTaskError, NotAllowed, PbtError
from tests.broker_process import REPO, BrokerProcess, write_ini
from tests.support import wait_until

MODULE = "reloadable"

SOURCE = '''\
import os
import time

from pbt_server import codeunit

VERSION = {version!r}{padding}


@codeunit(500)
def version(ctx):
    return {{"version": VERSION}}


@codeunit(501)
def hold(ctx):
    """Runs until the test creates the file named by the 'release' parameter."""
    while not os.path.exists(ctx.parameters["release"]):
        time.sleep(0.005)
    return {{"version": VERSION}}


@codeunit(503, shared=True, cache=True)
def shared_hold(ctx):
    return hold(ctx)
'''


def write_module(directory: Path, version: str) -> None:
    # A different size for every version: a .pyc is checked by its source's mtime (in
    # seconds) and size, so two versions written within one second must differ in size.
    padding = "  # " + "v" * len(version) * 3
    (directory / f"{MODULE}.py").write_text(SOURCE.format(version=version, padding=padding))


def settings(directory: Path, **workers: str) -> dict[str, dict[str, str]]:
    return {
        "Workers": {"Count": "1", **workers},
        "Codeunits": {"Modules": f"tests.codeunits, {MODULE}"},
    }


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    write_module(directory, "1")
    return directory


@pytest.fixture
def reloadable(
    start_broker: Callable[..., BrokerProcess], code_dir: Path
) -> Callable[..., BrokerProcess]:
    def start(**kw: object) -> BrokerProcess:
        return start_broker(settings(code_dir), env={"PYTHONPATH": str(code_dir)}, **kw)

    return start


def reload_command(broker: BrokerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbt_server", "reload", "--config", str(broker.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rewrite_ini(broker: BrokerProcess, code_dir: Path, **sections: dict[str, str]) -> None:
    """The broker's server.ini with ``sections``' keys changed."""
    current = {
        "Server": {
            "SocketPath": str(broker.socket),
            "PidFile": str(broker.directory / "pbt.pid"),
            "LogFile": str(broker.log),
            "LogLevel": "DEBUG",
        },
        "Database": {"Url": f"sqlite:///{broker.directory}/test.db"},
        **settings(code_dir),
    }
    for section, keys in sections.items():
        current.setdefault(section, {}).update(keys)
    write_ini(broker.config, current)


def running_codeunits(broker: BrokerProcess) -> list[int]:
    """The codeunits the broker's workers run now (shared executions too)."""
    return [w["codeunit"] for w in broker.status()["workers"] if w["state"] == "busy"]


def test_running_tasks_finish_on_the_old_code_and_waiting_ones_run_the_new(
    reloadable: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    broker = reloadable()
    release = tmp_path / "release"
    with broker.connect() as session:
        page = session.open_page("Customer Card", "C1")
        held = page.enqueue_background_task(501, {"release": str(release)})
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        waiting = [page.enqueue_background_task(500) for _ in range(5)]

        write_module(code_dir, "2")
        done = reload_command(broker)
        assert done.returncode == 0, done.stderr + broker.log_text()
        assert "reloaded in" in done.stdout

        release.touch()
        assert held.result(timeout=30) == {"version": "1"}  # it was running: old code
        assert [t.result(timeout=30) for t in waiting] == [{"version": "2"}] * 5
        assert page.enqueue_background_task(500).result(timeout=30) == {"version": "2"}
        session.ping()  # the same session, never told to go away
    log = broker.wait_for_log("reloaded (pbt-server reload)")
    assert "ServerShuttingDown" not in log


def test_a_task_enqueued_after_a_reload_does_not_attach_to_an_old_code_execution(
    reloadable: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    broker = reloadable()
    release = tmp_path / "release"
    params = {"release": str(release)}
    with broker.connect() as session:
        page = session.open_page("Role Center")
        before = page.enqueue_background_task(503, params)
        wait_until(lambda: running_codeunits(broker) == [503])
        write_module(code_dir, "2")
        assert reload_command(broker).returncode == 0
        after = page.enqueue_background_task(503, params)  # identical, but the code is new
        release.touch()
        assert before.result(timeout=30) == {"version": "1"}  # it was running: old code
        assert after.result(timeout=30) == {"version": "2"}
        assert broker.status()["totals"]["shared"]["attaches"] == 0


def test_a_cached_execution_that_ends_after_a_reload_is_not_served_afterwards(
    reloadable: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    broker = reloadable()
    release = tmp_path / "release"
    params = {"release": str(release)}
    with broker.connect() as session:
        page = session.open_page("Role Center")
        before = page.enqueue_background_task(503, params)
        wait_until(lambda: running_codeunits(broker) == [503])
        write_module(code_dir, "2")
        assert reload_command(broker).returncode == 0
        release.touch()
        assert before.result(timeout=30) == {"version": "1"}
        # The data has not changed, but the code has: the old code's result is not served.
        assert page.enqueue_background_task(503, params).result(timeout=30) == {"version": "2"}


def test_a_module_that_fails_to_import_keeps_the_running_code(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    (code_dir / f"{MODULE}.py").write_text("def broken(:\n")
    done = reload_command(broker)
    assert done.returncode == 1
    assert "reload refused" in done.stderr
    assert "SyntaxError" in done.stderr or "invalid syntax" in done.stderr, done.stderr
    assert MODULE in done.stderr
    with broker.connect() as session:
        page = session.open_page("Cue")
        assert page.enqueue_background_task(500).result(timeout=30) == {"version": "1"}
    broker.wait_for_log("refused")


def test_a_module_that_exits_at_import_harms_only_the_trial(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    workers = broker.worker_pids()
    (code_dir / f"{MODULE}.py").write_text("import os\nos._exit(7)\n")
    done = reload_command(broker)
    assert done.returncode == 1
    assert "exited with code 7" in done.stderr, done.stderr
    assert broker.worker_pids() == workers  # nothing was renewed
    with broker.connect() as session:
        assert session.open_page("Cue").enqueue_background_task(500).result(30) == {"version": "1"}


def test_a_codeunit_the_new_code_drops_fails_its_waiting_tasks_cleanly(
    reloadable: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    broker = reloadable()
    release = tmp_path / "release"
    with broker.connect() as session:
        page = session.open_page("Cue")
        held = page.enqueue_background_task(501, {"release": str(release)})
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        orphan = page.enqueue_background_task(500)
        (code_dir / f"{MODULE}.py").write_text(
            "from pbt_server import codeunit\n\n\n@codeunit(502)\ndef other(ctx):\n"
            "    return {'other': 'yes'}\n"
        )
        assert reload_command(broker).returncode == 0
        release.touch()
        assert held.result(timeout=30) == {"version": "1"}
        with pytest.raises(BackgroundTaskError) as failed:
            orphan.result(timeout=30)
        assert failed.value.code == "UnknownCodeunit"
        with pytest.raises(PbtError) as refused:
            page.enqueue_background_task(500)
        assert refused.value.code == "UnknownCodeunit"
        assert page.enqueue_background_task(502).result(timeout=30) == {"other": "yes"}


def test_settings_apply_and_restart_keys_are_reported(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    with broker.connect() as session:
        page = session.open_page("Cue")
        rewrite_ini(
            broker,
            code_dir,
            Workers={"Count": "3"},
            AsynchronousProcessing={"ChildSessionsMaxQueueLength": "2"},
            Server={"PidFile": str(broker.directory / "elsewhere.pid"), "MaxFrameBytes": "4096"},
        )
        done = reload_command(broker)
        assert done.returncode == 0, done.stderr
        assert "[Server] PidFile changed; it applies only after a restart" in done.stdout
        assert "[Server] MaxFrameBytes changed" in done.stdout

        def three_idle() -> bool:
            workers = broker.status()["workers"]
            slots = [w for w in workers if w["slot"] != "standby"]
            return len(slots) == 3 and all(w["state"] == "idle" for w in slots)

        wait_until(three_idle, timeout=30)
        # The queue limit applies to new enqueues: hold the workers, then fill the queue.
        release = broker.directory / "release"
        held = [page.enqueue_background_task(501, {"release": str(release)}) for _ in range(3)]
        wait_until(lambda: broker.status()["totals"]["running"] == 3)
        queued = [page.enqueue_background_task(500) for _ in range(2)]
        with pytest.raises(PbtError) as full:
            page.enqueue_background_task(500)
        assert full.value.code == "ChildSessionQueueFull"
        release.touch()
        for task in held + queued:
            task.result(timeout=30)
        big = page.enqueue_background_task(500, {"x": "y" * 8000})  # the old frame limit
        assert big.result(timeout=30) == {"version": "1"}
    assert (broker.directory / "pbt.pid").exists()  # still where it was


def test_a_bad_server_ini_is_refused_and_changes_nothing(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    workers = broker.worker_pids()
    rewrite_ini(broker, code_dir, Workers={"Count": "many"})
    done = reload_command(broker)
    assert done.returncode == 2  # the command reads the file too, and says so first
    assert "[Workers] Count = 'many'" in done.stderr
    assert broker.worker_pids() == workers


def test_sighup_reloads(reloadable: Callable[..., BrokerProcess], code_dir: Path) -> None:
    broker = reloadable()
    write_module(code_dir, "3")
    broker.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "reloaded (SIGHUP)" in broker.log_text(), timeout=60)
    with broker.connect() as session:
        assert session.open_page("Cue").enqueue_background_task(500).result(30) == {"version": "3"}


def test_run_reload_watches_the_module_files(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable(run_args=("--reload",))
    with broker.connect() as session:
        page = session.open_page("Cue")
        assert page.enqueue_background_task(500).result(30) == {"version": "1"}
        write_module(code_dir, "22")
        wait_until(lambda: f"reloaded ({MODULE}.py changed)" in broker.log_text(), timeout=60)
        assert page.enqueue_background_task(500).result(30) == {"version": "22"}
        # A broken file is reported once, and the next good one reloads again.
        (code_dir / f"{MODULE}.py").write_text("raise RuntimeError('half-saved')\n")
        wait_until(lambda: "half-saved" in broker.log_text(), timeout=60)
        assert page.enqueue_background_task(500).result(30) == {"version": "22"}
        write_module(code_dir, "333")
        wait_until(lambda: broker.log.read_text().count(f"reloaded ({MODULE}.py") >= 2, 60)
        assert page.enqueue_background_task(500).result(30) == {"version": "333"}


def test_a_session_may_not_reload(reloadable: Callable[..., BrokerProcess]) -> None:
    broker = reloadable()
    with broker.connect() as session, pytest.raises(NotAllowed):
        session._request("reload", {})


def test_a_reload_under_load_loses_no_session_and_no_task(
    reloadable: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    """100 sessions with 10 waiting tasks each behind held workers: every task ends
    completed, on the new code, and every session is still open after the reload."""
    broker = reloadable()
    release = tmp_path / "release"

    async def scenario() -> tuple[list[dict[str, str]], dict[str, float]]:
        sessions = [await aio.connect(str(broker.socket)) for _ in range(100)]
        try:
            pages = [await s.open_page("Cue", f"R{i}") for i, s in enumerate(sessions)]
            held = await pages[0].enqueue_background_task(501, {"release": str(release)})
            waiting = [await p.enqueue_background_task(500) for p in pages for _ in range(10)]
            assert broker.status()["totals"]["waiting"] == 1000
            write_module(code_dir, "2")
            done = await asyncio.to_thread(reload_command, broker)
            assert done.returncode == 0, done.stderr
            seconds = _reload_seconds(broker.log.read_text())
            release.touch()
            results = [await t.result(timeout=60) for t in [held, *waiting]]
            for s in sessions:
                await s.ping()
            return results, seconds
        finally:
            for s in sessions:
                await s.close()

    results, seconds = asyncio.run(scenario())
    assert results[0] == {"version": "1"}
    assert results[1:] == [{"version": "2"}] * 1000
    print(f"reload with 1000 waiting tasks and 100 sessions: {seconds}")


def _reload_seconds(log: str) -> dict[str, float]:
    line = next(line for line in log.splitlines() if "reloaded (pbt-server reload)" in line)
    return {"total_ms": float(line.split(" in ")[1].split(" ms")[0])}


def test_a_moved_socket_is_reported_and_sighup_reloads_the_rest(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    rewrite_ini(
        broker,
        code_dir,
        Server={"SocketPath": str(broker.directory / "moved.sock")},
        AsynchronousProcessing={"ChildSessionsMaxConcurrency": "3"},
    )
    done = reload_command(broker)
    assert done.returncode == 1
    assert f"pbt-server (pid {broker.pid}) runs but does not answer" in done.stderr
    assert f"kill -HUP {broker.pid}" in done.stderr
    broker.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "reloaded (SIGHUP)" in broker.log.read_text(), timeout=60)
    assert "applied only by a restart: [Server] SocketPath" in broker.log.read_text()
    assert broker.socket.exists()
    assert broker.status()["sessions"] == []  # still answering where it was


def test_log_level_and_format_change_on_reload(
    reloadable: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = reloadable()
    with broker.connect() as session:
        page = session.open_page("Cue")
        before = page.enqueue_background_task(500)
        before.result(timeout=30)
        wait_until(lambda: f"task s{session.id}/t{before.id} completed" in broker.log.read_text())
        rewrite_ini(broker, code_dir, Server={"LogLevel": "INFO", "LogFormat": "json"})
        assert reload_command(broker).returncode == 0
        after = page.enqueue_background_task(500)
        after.result(timeout=30)
    broker.process.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    wait_until(lambda: '"message": "log file reopened (SIGUSR1)"' in broker.log.read_text())
    # The task after the reload left no DEBUG line, in either format.
    assert f"t{after.id} completed" not in broker.log.read_text()


def test_a_smaller_pool_lets_busy_workers_finish_first(
    start_broker: Callable[..., BrokerProcess], code_dir: Path, tmp_path: Path
) -> None:
    broker = start_broker(settings(code_dir, Count="3"), env={"PYTHONPATH": str(code_dir)})
    release = tmp_path / "release"
    with broker.connect() as session:
        page = session.open_page("Cue")
        held = [page.enqueue_background_task(501, {"release": str(release)}) for _ in range(3)]
        wait_until(lambda: broker.status()["totals"]["running"] == 3)
        rewrite_ini(broker, code_dir, Workers={"Count": "1"})
        assert reload_command(broker).returncode == 0
        assert broker.status()["totals"]["running"] == 3  # nobody was killed
        release.touch()
        assert [t.result(timeout=30) for t in held] == [{"version": "1"}] * 3

        def one_slot() -> bool:
            slots = [w for w in broker.status()["workers"] if w["slot"] != "standby"]
            return len(slots) == 1 and slots[0]["state"] == "idle"

        wait_until(one_slot, timeout=30)
        assert page.enqueue_background_task(500).result(timeout=30) == {"version": "1"}
    wait_until(lambda: len(broker._children()) == 2, timeout=30)  # one worker, one standby


def test_a_smaller_pool_retires_its_idle_workers(
    start_broker: Callable[..., BrokerProcess], code_dir: Path
) -> None:
    broker = start_broker(settings(code_dir, Count="3"), env={"PYTHONPATH": str(code_dir)})
    wait_until(lambda: [w["state"] for w in broker.status()["workers"]] == ["idle"] * 4)
    write_module(code_dir, "2")
    rewrite_ini(broker, code_dir, Workers={"Count": "1"})
    assert reload_command(broker).returncode == 0
    with broker.connect() as session:
        page = session.open_page("Cue")
        # No worker of a removed slot runs anything, let alone the old code.
        done = [page.enqueue_background_task(500).result(timeout=30) for _ in range(3)]
        assert done == [{"version": "2"}] * 3
    wait_until(lambda: len(broker._children()) == 2, timeout=30)  # one worker, one standby
    assert "died" not in broker.log_text()  # retired, not killed as strays
    assert broker.status()["totals"]["worker_ends"].get("crash", 0) == 0
