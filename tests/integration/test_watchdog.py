"""The watchdog kills for real: timeouts, memory, process trees (SPEC §3, issue 2 §6)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.support import recorder, wait_until


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_timeout_kills_the_worker_and_reports_ChildSessionTaskTimeout(broker):
    errors: list[tuple[int, str, str, str]] = []
    with broker.connect() as session:
        page = session.open_page("P")
        page.on_error = recorder(errors, handled=True)
        before = set(broker.worker_pids())
        started = time.monotonic()
        task = page.enqueue_background_task(cu.SPIN, timeout=300)
        with pytest.raises(BackgroundTaskError) as caught:
            task.result(timeout=20)
        elapsed = time.monotonic() - started
        assert caught.value.code == "ChildSessionTaskTimeout"
        assert caught.value.text == "Child Session task was terminated because of a timeout."
        # never before the deadline (the clock starts at the hand-over, after enqueue)
        assert elapsed >= 0.3
        wait_until(lambda: errors)
        assert errors[0][:2] == (task.id, "ChildSessionTaskTimeout")
        # exactly one worker (the spinner) was killed, and its slot has a fresh worker
        wait_until(lambda: len(set(broker.worker_pids()) - before) == 1)
        (killed,) = before - set(broker.worker_pids())
        assert not _alive(killed)
        assert page.enqueue_background_task(cu.NOOP).result(timeout=10) == {}


def test_queue_wait_does_not_count_against_the_timeout(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session:
        page = session.open_page("P")
        first = page.enqueue_background_task(cu.SLEEP, {"seconds": "1.0"})
        # waits ~1 s behind `first`, then runs 0.1 s of its 800 ms budget
        second = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.1"}, timeout=800)
        assert first.result(timeout=10)["slept"] == "1.0"
        assert second.result(timeout=10)["slept"] == "0.1"


def test_timeout_default_and_clamp_to_the_maximum(start_broker):
    broker = start_broker(
        {
            "AsynchronousProcessing": {
                "PageBackgroundTaskDefaultTimeout": "00:00:00.4",
                "PageBackgroundTaskMaxTimeout": "00:00:00.6",
            }
        }
    )
    with broker.connect() as session:
        page = session.open_page("P")
        defaulted = page.enqueue_background_task(cu.CONTEXT)
        assert 0 < int(defaulted.result(timeout=10)["remaining_ms"]) <= 400
        clamped = page.enqueue_background_task(cu.CONTEXT, timeout=60_000)
        assert 400 < int(clamped.result(timeout=10)["remaining_ms"]) <= 600
        started = time.monotonic()
        with pytest.raises(BackgroundTaskError, match="timeout"):
            page.enqueue_background_task(cu.SPIN, timeout=60_000).result(timeout=20)
        assert time.monotonic() - started >= 0.6


def test_timeout_kills_the_whole_process_tree(broker, tmp_path):
    pidfile = tmp_path / "pids"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(
            cu.SPAWN_AND_SPIN, {"pidfile": str(pidfile)}, timeout=1500
        )
        wait_until(pidfile.exists)
        worker_pid, sleep_pid = map(int, pidfile.read_text().split())
        assert _alive(sleep_pid)
        with pytest.raises(BackgroundTaskError, match="timeout"):
            task.result(timeout=20)
        wait_until(lambda: not _alive(worker_pid) and not _alive(sleep_pid))
        broker.wait_workers_replaced(worker_pid)


def test_cancel_kills_the_whole_process_tree(broker, tmp_path):
    pidfile = tmp_path / "pids"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.SPAWN_AND_SPIN, {"pidfile": str(pidfile)})
        wait_until(pidfile.exists)
        worker_pid, sleep_pid = map(int, pidfile.read_text().split())
        assert task.cancel() is True
        wait_until(lambda: not _alive(worker_pid) and not _alive(sleep_pid))
        broker.wait_workers_replaced(worker_pid)


def test_a_daemon_escaping_a_finished_task_is_killed(broker, tmp_path):
    pidfile = tmp_path / "daemon"
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.ESCAPE, {"pidfile": str(pidfile)}).result(10) == {}
        wait_until(pidfile.exists)
        daemon = int(pidfile.read_text())
        # setsid + double fork: not in the worker's group or tree; the broker (child subreaper)
        # inherits it and its periodic sweep kills it
        wait_until(lambda: not _alive(daemon), timeout=15)


def test_memory_limit(start_broker):
    broker = start_broker({"Workers": {"Count": "1", "MaxMemoryMB": "150"}})
    with broker.connect() as session:
        page = session.open_page("P")
        small = page.enqueue_background_task(cu.ALLOCATE, {"mb": "10", "seconds": "0.2"})
        assert small.result(timeout=10)["len"] == str(10 * 2**20)
        big = page.enqueue_background_task(cu.ALLOCATE, {"mb": "400", "seconds": "30"})
        with pytest.raises(BackgroundTaskError) as caught:
            big.result(timeout=20)
        assert caught.value.code == "ChildSessionMemoryLimit"
        assert "150 MB" in caught.value.text
        assert page.enqueue_background_task(cu.NOOP).result(timeout=10) == {}


def test_worker_is_recycled_after_max_tasks(start_broker):
    broker = start_broker({"Workers": {"Count": "1", "MaxTasksPerWorker": "3"}})
    with broker.connect() as session:
        page = session.open_page("P")
        pids = [
            page.enqueue_background_task(cu.CONTEXT).result(timeout=10)["pid"] for _ in range(7)
        ]
    assert pids[0] == pids[1] == pids[2]
    assert pids[3] == pids[4] == pids[5] != pids[2]
    assert pids[6] not in pids[:6]


def test_a_worker_that_cannot_boot_stops_the_start(start_broker, tmp_path):
    from tests.broker_process import BrokerProcess

    with pytest.raises(AssertionError, match="exited with 1") as caught:
        BrokerProcess.start({"Database": {"Url": f"sqlite:///{tmp_path}/missing.db"}})
    assert "does not exist" in str(caught.value)


def _standby_booted(broker) -> bool:
    workers = {str(w["slot"]): w for w in broker.status()["workers"]}
    return workers.get("standby", {}).get("state") == "idle" and workers["0"]["state"] == "idle"


def test_a_database_outage_fails_tasks_but_never_stops_the_server(start_broker):
    # A replacement worker boots without its database and connects on its first statement:
    # meanwhile tasks fail with DB:ConnectionLost; once the database is back they succeed.
    broker = start_broker({"Workers": {"Count": "1"}})
    database = broker.directory / "test.db"
    hidden = broker.directory / "hidden.db"
    with broker.connect() as session:
        page = session.open_page("P")
        database.rename(hidden)  # open connections keep working; new ones cannot open it
        for _ in range(2):  # the first replacement is the standby, booted before the outage
            wait_until(lambda: _standby_booted(broker), timeout=20)
            running = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
            wait_until(lambda: broker.status()["workers"][0]["state"] == "busy")
            assert page.cancel_background_task(running.id)  # kills the worker
        wait_until(lambda: _standby_booted(broker), timeout=20)
        error = page.enqueue_background_task(cu.DB_READ).exception(timeout=30)
        assert error is not None
        assert error.code == "DB:ConnectionLost", error
        assert "does not exist" in error.text
        hidden.rename(database)
        assert page.enqueue_background_task(cu.DB_READ).result(timeout=30) == {"blocked": "10"}
    assert "failed to boot" not in broker.log_text()


def test_a_timeout_error_carries_the_stuck_codes_stack(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        error = page.enqueue_background_task(cu.SPIN, timeout=300).exception(timeout=20)
    assert error is not None
    assert error.code == "ChildSessionTaskTimeout"
    assert error.text == "Child Session task was terminated because of a timeout."
    # the Python stack of the code that was stuck, as faulthandler saw it at the deadline
    assert "most recent call first" in error.call_stack
    assert "in spin" in error.call_stack
    broker.wait_for_log("in spin")  # and the server log has it too


def test_a_worker_that_cannot_dump_its_stack_is_killed_all_the_same(broker, tmp_path):
    with broker.connect() as session:
        page = session.open_page("P")
        pidfile = tmp_path / "pid"
        task = page.enqueue_background_task(
            cu.SPAWN_AND_SPIN, {"pidfile": str(pidfile)}, timeout=2000
        )
        wait_until(pidfile.exists)
        worker = int(pidfile.read_text().split()[0])
        os.kill(worker, signal.SIGSTOP)  # a stopped process handles no signal: no dump
        error = task.exception(timeout=20)
    assert error is not None
    assert error.code == "ChildSessionTaskTimeout"
    assert "no stack: the worker did not answer SIGUSR2" in error.call_stack


def test_a_worker_whose_dump_signal_ends_it_is_replaced(start_broker):
    """A codeunit reset the stack-dump signal to its default, so the dump before the timeout
    kill ends the worker by itself: the task still times out and the slot gets a worker."""
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session:
        page = session.open_page("P")
        stuck = page.enqueue_background_task(cu.RESET_DUMP_SIGNAL, {"spin": "1"}, timeout=300)
        error = stuck.exception(timeout=20)
        assert isinstance(error, BackgroundTaskError)
        assert error.code == "ChildSessionTaskTimeout"
        # Said as it happened, not as a signal that went unanswered
        assert "no stack: the worker died while it was asked for it: killed by SIGUSR2" in (
            error.call_stack
        ), error.call_stack
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=20) == {"a": "b"}


def test_the_stack_dump_survives_a_task_that_reset_its_signal(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session:
        page = session.open_page("P")
        first = page.enqueue_background_task(cu.RESET_DUMP_SIGNAL).result(timeout=20)
        stuck = page.enqueue_background_task(cu.SPIN, timeout=300)
        error = stuck.exception(timeout=20)
        assert isinstance(error, BackgroundTaskError)
        assert error.code == "ChildSessionTaskTimeout"
        assert "in spin" in error.call_stack, error.call_stack
        assert first["pid"]  # the same worker ran both: the first left nothing Python sees


@pytest.mark.parametrize("resume_after", [0.7, 1.5])  # before / after the 1 s deadline
def test_a_task_its_worker_takes_late_gets_its_whole_timeout_from_the_take(
    start_broker, resume_after
):
    # A worker frozen before it takes its job (a machine too loaded to schedule it): the
    # task has not started, so it is not timed out at its deadline; once the worker takes
    # it, the task runs its timeout from there (within AckTimeout, 5 s here).
    broker = start_broker({"Workers": {"Count": "1"}})
    frozen = broker.worker_pids()[0]  # slot 0 (the standby comes last)
    os.kill(frozen, signal.SIGSTOP)
    try:
        with broker.connect() as session:
            page = session.open_page("P")
            handed = time.monotonic()
            task = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"}, timeout=1000)

            def slot_state() -> str:
                return str(broker.status()["workers"][0]["state"])

            wait_until(lambda: slot_state() == "starting")  # handed over, still in its pipe
            while time.monotonic() < handed + resume_after:  # time itself is what we wait for
                time.sleep(0.05)
            assert slot_state() == "starting"
            os.kill(frozen, signal.SIGCONT)
            assert task.result(timeout=20)["pid"] == str(frozen)  # not ChildSessionTaskTimeout
        broker.wait_for_log(f"task s{session.id}/t{task.id} was taken by worker {frozen} late")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
