"""Single-flight: identical tasks of a ``shared`` codeunit attach to one execution, and each
page keeps its own task id, triggers, record check and cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbt_server.client import BackgroundTaskCanceled, BackgroundTaskError
from pbt_server.errors import QueueFull
from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import wait_until


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_identical_tasks_from_many_sessions_run_once(start_broker, tmp_path) -> None:
    broker = start_broker({"Workers": {"Count": "2"}})
    go, ran = tmp_path / "go", tmp_path / "runs"
    params = {"go": str(go), "runs": str(ran)}
    sessions = [broker.connect() for _ in range(5)]
    try:
        pages = [s.open_page("Role Center") for s in sessions]
        first = pages[0].enqueue_background_task(cu.SHARED, params)
        wait_until(lambda: len(runs(ran)) == 1)  # it runs
        rest = [p.enqueue_background_task(cu.SHARED, params) for p in pages[1:]]
        other = pages[0].enqueue_background_task(cu.SHARED, {**params, "x": "1"})
        wait_until(lambda: len(runs(ran)) == 2)  # different parameters: another execution
        go.touch()
        results = [t.result(timeout=20) for t in [first, *rest]]
        assert len({r["pid"] for r in results}) == 1  # one worker ran them all
        assert [t.id for t in [first, *rest]] == [1, 1, 1, 1, 1]  # each session's own ids
        assert other.result(timeout=20)["pid"]
        assert len(runs(ran)) == 2
        # Once it has ended, an identical task runs again (no cache asked for).
        assert pages[1].enqueue_background_task(cu.SHARED, params).result(timeout=20)
        assert len(runs(ran)) == 3
    finally:
        for s in sessions:
            s.close()


def test_every_attached_page_gets_the_same_error(start_broker, tmp_path) -> None:
    broker = start_broker()
    go, ran = tmp_path / "go", tmp_path / "runs"
    params = {"go": str(go), "runs": str(ran), "fail": "no customers today"}
    with broker.connect() as a, broker.connect() as b:
        tasks = [s.open_page("Cue").enqueue_background_task(cu.SHARED, params) for s in (a, b)]
        go.touch()
        for task in tasks:
            with pytest.raises(BackgroundTaskError) as failed:
                task.result(timeout=20)
            assert failed.value.code == "CUST:Shared"
            assert failed.value.text == "no customers today"
    assert len(runs(ran)) == 1


def test_cancelling_detaches_one_page_and_the_last_one_kills_the_run(
    start_broker, tmp_path
) -> None:
    broker = start_broker({"Workers": {"Count": "1"}})
    go, ran = tmp_path / "go", tmp_path / "runs"
    params = {"go": str(go), "runs": str(ran)}
    with broker.connect() as a, broker.connect() as b, broker.connect() as c:
        pa, pb, pc = (s.open_page("Cue", "R1") for s in (a, b, c))
        ta = pa.enqueue_background_task(cu.SHARED, params)
        wait_until(lambda: len(runs(ran)) == 1)
        worker = int(runs(ran)[0])
        tb = pb.enqueue_background_task(cu.SHARED, params)
        tc = pc.enqueue_background_task(cu.SHARED, params)
        assert ta.cancel()
        pb.set_record("R2")  # its record changed: its task goes, the run goes on
        with pytest.raises(BackgroundTaskCanceled):
            ta.result(timeout=20)
        with pytest.raises(BackgroundTaskCanceled):
            tb.result(timeout=20)
        assert alive(worker)
        pc.close()  # the last one: nobody waits, so the worker is killed
        wait_until(lambda: not alive(worker), timeout=20)
        with pytest.raises(BackgroundTaskCanceled):
            tc.result(timeout=20)
        # The pool serves on, and the same parameters start a fresh run.
        go.touch()
        assert a.open_page("Cue").enqueue_background_task(cu.SHARED, params).result(20)
    assert len(runs(ran)) == 2


def test_an_attached_task_counts_in_its_sessions_queue(start_broker, tmp_path) -> None:
    broker = start_broker({"AsynchronousProcessing": {"ChildSessionsMaxQueueLength": "2"}})
    go, ran = tmp_path / "go", tmp_path / "runs"
    params = {"go": str(go), "runs": str(ran)}
    with broker.connect() as session:
        page = session.open_page("Cue")
        held = [page.enqueue_background_task(cu.SHARED, params) for _ in range(2)]
        with pytest.raises(QueueFull):
            page.enqueue_background_task(cu.SHARED, params)
        go.touch()
        assert held[0].result(timeout=20) == held[1].result(timeout=20)


def test_the_context_is_part_of_the_key_only_when_asked(start_broker, tmp_path) -> None:
    broker = start_broker()
    go, ran = tmp_path / "go", tmp_path / "runs"
    params = {"go": str(go), "runs": str(ran)}
    go.touch()
    with (
        broker.connect(context={"user": "ann"}) as ann,
        broker.connect(context={"user": "bob"}) as bob,
    ):
        pa, pb = ann.open_page("Cue"), bob.open_page("Cue")
        # Not per context: the execution sees no context at all (it is nobody's).
        assert pa.enqueue_background_task(cu.SHARED, params).result(20)["user"] == ""
        mine = pa.enqueue_background_task(cu.SHARED_PER_CONTEXT, params)
        theirs = pb.enqueue_background_task(cu.SHARED_PER_CONTEXT, params)
        assert mine.result(20)["user"] == "ann"
        assert theirs.result(20)["user"] == "bob"
