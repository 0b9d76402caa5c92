"""Nothing one task does reaches another: forged pipe messages, leftovers, forked copies."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest

from pbt_server.client import BackgroundTaskError
from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import wait_until


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("done-without-results", "done: missing field 'results'"),
        ("not-a-map", "not a map"),
        ("garbage", "not msgpack"),
        ("other-job", "which it is not running"),
        ("huge-results", "bytes in one message"),
    ],
)
def test_a_forged_pipe_message_fails_only_its_own_task(start_broker, kind, says):
    broker = start_broker({"Workers": {"Count": "2"}})
    with broker.connect() as session, broker.connect() as bystander:
        page, other = session.open_page("P"), bystander.open_page("Q")
        innocent = [other.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"}) for _ in range(3)]
        forged = page.enqueue_background_task(cu.FORGE, {"kind": kind}, timeout=60_000)
        error = forged.exception(timeout=20)
        assert isinstance(error, BackgroundTaskError), error
        assert error.code == "ChildSessionCrashed"
        assert "broke the pipe protocol" in error.text
        assert says in error.text
        # (had the broker taken no notice, the codeunit would have completed after 5 s)
        assert [t.result(timeout=20)["slept"] for t in innocent] == ["0.3"] * 3
        # the worker was replaced and the pool serves on
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=20) == {"a": "b"}
    broker.wait_for_log("broke the pipe protocol")


@pytest.mark.parametrize(
    "what", ["thread", "alarm", "handler", "rlimit", "cwd", "environ", "child"]
)
def test_a_task_that_leaves_something_behind_gets_a_fresh_worker_next(start_broker, what):
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session:
        page = session.open_page("P")
        clean = page.enqueue_background_task(cu.LEAVE_BEHIND).result(timeout=20)["pid"]
        again = page.enqueue_background_task(cu.LEAVE_BEHIND).result(timeout=20)["pid"]
        assert clean == again  # a clean task keeps its worker: no fork, no cost
        dirty = page.enqueue_background_task(cu.LEAVE_BEHIND, {"what": what}).result(timeout=20)
        assert dirty["pid"] == clean
        after = page.enqueue_background_task(cu.LEAVE_BEHIND).result(timeout=20)["pid"]
        assert after != clean  # the next session's task never runs in that process
        line = f"worker {clean} retired: task s{session.id}/t3 left behind"
    wait_until(lambda: not alive(int(clean)), timeout=20)  # retired, and gone
    broker.wait_for_log(line)


def test_a_forked_copy_of_a_worker_holds_neither_pipe(start_broker, tmp_path):
    broker = start_broker({"Workers": {"Count": "1"}})
    report = tmp_path / "fork-report.txt"
    with broker.connect() as session:
        page = session.open_page("P")
        page.enqueue_background_task(cu.FORK_AND_READ, {"report": str(report)}).result(timeout=20)
    assert report.read_text() == "job:closed result:closed"
    # and that worker was retired (the log is written by a thread of its own: poll)
    wait_until(lambda: "a forked process" in broker.log_text())


def test_a_half_read_cursor_does_not_hold_the_database_for_the_application(start_broker):
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.enqueue_background_task(cu.HALF_READ).result(timeout=20) == {"first": "1"}
        # The application writes between tasks: SQLite's shared lock must be gone.
        with sqlite3.connect(broker.directory / "test.db", timeout=0.5) as db:
            db.execute("UPDATE customer SET name = 'changed' WHERE id = 1")
        db.close()


def test_a_child_session_cannot_start_background_tasks(start_broker):
    broker = start_broker()
    with broker.connect() as session:
        page = session.open_page("P")
        results = page.enqueue_background_task(
            cu.CONNECT_BACK, {"socket": str(broker.socket)}
        ).result(timeout=20)
    assert results["inside"] == "True"
    assert results["code"] == "NotAllowed"
    assert "a child session cannot start background tasks" in results["text"]


def test_the_session_context_reaches_every_task_and_status(start_broker):
    from pbt_server.client import connect

    broker = start_broker()
    context = {"user": "ALICE", "company": "CRONUS"}
    with connect(str(broker.socket), context=context) as session:
        page = session.open_page("P")
        results = page.enqueue_background_task(cu.BEHAVE).result(timeout=20)
        assert results["context"] == repr(context)
        (row,) = [s for s in broker.status()["sessions"] if s["id"] == session.id]
        assert row["context"] == context


def test_what_a_killed_broker_left_behind_is_killed_by_its_next_start(start_broker, tmp_path):
    broker = start_broker({"Workers": {"Count": "1"}})
    pidfile = tmp_path / "spawned.pid"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.SPAWN_AND_SPIN, {"pidfile": str(pidfile)})
        wait_until(pidfile.exists)
        worker, child = (int(pid) for pid in pidfile.read_text().split())
        os.kill(broker.pid, signal.SIGKILL)  # the worker dies with it; its child does not
        assert broker.process is not None
        broker.process.wait()
        wait_until(lambda: not alive(worker), timeout=20)
        assert alive(child)
        task.exception(timeout=20)
    broker.launch()  # the same server again: the same pid file
    wait_until(lambda: not alive(child), timeout=20)
    broker.wait_for_log("killed 1 process(es) a previous run left behind")


def test_words_after_a_tasks_end_cannot_answer_for_the_next_task(start_broker, tmp_path):
    """A worker's own ``done``, then ``started`` and ``done`` for the job it would be handed
    next (another session's): the forger's task fails, the victim runs for real."""
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session, broker.connect() as victim:
        page = session.open_page("P")
        go = tmp_path / "go"
        forged = page.enqueue_background_task(
            cu.FORGE, {"kind": "next-job", "go": str(go)}, timeout=60_000
        )
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        innocent = victim.open_page("Q").enqueue_background_task(cu.ECHO, {"real": "yes"})
        go.touch()
        error = forged.exception(timeout=20)
        assert isinstance(error, BackgroundTaskError), error
        assert error.code == "ChildSessionCrashed"
        assert "wrote more after its 'done'" in error.text
        assert innocent.result(timeout=20) == {"real": "yes"}


def test_an_answer_for_a_job_its_worker_never_took_is_refused(start_broker):
    """A worker's own ``done``, then, once it was handed the next job (another session's),
    a ``done`` for that job without having read it: the job is still in the pipe, so the
    answer is refused, the worker killed, and the victim runs for real, elsewhere."""
    broker = start_broker({"Workers": {"Count": "1"}})
    with broker.connect() as session, broker.connect() as victim:
        page = session.open_page("P")
        forged = page.enqueue_background_task(cu.FORGE, {"kind": "next-job-later"})
        wait_until(lambda: broker.status()["totals"]["running"] == 1)
        innocent = victim.open_page("Q").enqueue_background_task(cu.ECHO, {"real": "yes"})
        assert forged.result(timeout=20) == {"forged": "own"}  # its own end was its own
        assert innocent.result(timeout=20) == {"real": "yes"}
    log = broker.wait_for_log("before taking it off its pipe")
    assert f"task s{victim.id}/t{innocent.id} never started there, so it is requeued" in log


def test_a_forked_copy_dies_with_its_worker_even_when_the_broker_is_killed(start_broker, tmp_path):
    """A child made with os.fork carries no child-session mark the next start could find
    (/proc shows the environment of an exec), so it dies with the worker that forked it."""
    broker = start_broker({"Workers": {"Count": "1"}})
    pidfile = tmp_path / "forked.pid"
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.FORK_DAEMON, {"pidfile": str(pidfile)})
        wait_until(pidfile.exists)
        worker, child = (int(pid) for pid in pidfile.read_text().split())
        assert alive(child)
        os.kill(broker.pid, signal.SIGKILL)
        assert broker.process is not None
        broker.process.wait()
        wait_until(lambda: not alive(worker), timeout=20)
        wait_until(lambda: not alive(child), timeout=20)
        task.exception(timeout=20)
