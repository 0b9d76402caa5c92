"""Business Central's rules as a page meets them: one story per task, the Ok form, triggers
only while the parent is idle, pending work, TaskId first, the patterns BC documents."""

from __future__ import annotations

import asyncio
import itertools
import os
import selectors
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbt_server.client import (
    BackgroundTaskCanceled,
    ClientClosed,
    QueueFull,
    UnknownCodeunit,
    connect,
)
from pbt_server.client import aio as aio_client
from tests import codeunits as cu
from tests.support import wait_until


def test_an_outcome_waiting_behind_a_slow_trigger_is_cancelled_when_the_page_moves_on(broker):
    """The handle and the triggers tell one story: B's outcome arrives while A's trigger holds
    the dispatcher; the page then moves to another record; B is cancelled, no trigger runs."""
    release = threading.Event()
    triggered: list[int] = []
    with broker.connect() as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")

        def on_completed(task_id: int, results: dict[str, str]) -> None:
            triggered.append(task_id)
            if task_id == a.id:
                release.wait(30)  # the dispatcher is busy with A

        page.on_completed = on_completed
        a = page.enqueue_background_task(cu.NOOP)
        wait_until(lambda: triggered == [a.id])
        b = page.enqueue_background_task(cu.NOOP)
        wait_until(b.done)  # B's outcome is here; its trigger is queued behind A's
        page.set_record("Customer: 20000")
        release.set()
        with pytest.raises(BackgroundTaskCanceled) as caught:
            b.result(timeout=20)
        assert caught.value.code == "RecordChanged"
        c = page.enqueue_background_task(cu.NOOP)  # the next trigger shows the queue drained
        c.result(timeout=20)
        wait_until(lambda: triggered[-1:] == [c.id])
    assert b.id not in triggered


def test_an_outcome_taken_before_the_page_moves_on_keeps_its_trigger(broker):
    release = threading.Event()
    triggered: list[int] = []
    with broker.connect() as session:
        page = session.open_page("Customer Card", record_id="Customer: 10000")

        def on_completed(task_id: int, results: dict[str, str]) -> None:
            triggered.append(task_id)
            if task_id == a.id:
                release.wait(30)

        page.on_completed = on_completed
        a = page.enqueue_background_task(cu.NOOP)
        wait_until(lambda: triggered == [a.id])
        b = page.enqueue_background_task(cu.ECHO, {"x": "1"})
        assert b.result(timeout=20) == {"x": "1"}  # taken: decided completed
        page.set_record("Customer: 20000")
        release.set()
        wait_until(lambda: triggered == [a.id, b.id])  # so its trigger runs


def test_the_ok_form_returns_none_and_keeps_the_reason(start_broker):
    broker = start_broker(
        {
            "Workers": {"Count": "1"},
            "AsynchronousProcessing": {
                "ChildSessionsMaxConcurrency": "1",
                "ChildSessionsMaxQueueLength": "1",
            },
        }
    )
    with broker.connect() as session:
        page = session.open_page("P")
        assert page.try_enqueue_background_task(987_654) is None
        assert isinstance(page.last_enqueue_error, UnknownCodeunit)
        assert page.last_enqueue_error.code == "UnknownCodeunit"
        running = page.try_enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        assert running is not None
        assert page.last_enqueue_error is None
        wait_until(lambda: broker.status()["workers"][0]["state"] == "busy")
        assert page.try_enqueue_background_task(cu.NOOP) is not None  # waits: queue of 1
        assert page.try_enqueue_background_task(cu.NOOP) is None
        assert isinstance(page.last_enqueue_error, QueueFull)
        running.cancel()
    with pytest.raises(ClientClosed):  # a misuse is still an exception
        page.try_enqueue_background_task(cu.NOOP)


def test_the_ok_form_in_asyncio(broker):
    async def scenario() -> None:
        async with await aio_client.connect(str(broker.socket)) as session:
            page = await session.open_page("P")
            assert await page.try_enqueue_background_task(987_654) is None
            assert page.last_enqueue_error is not None
            assert page.last_enqueue_error.code == "UnknownCodeunit"
            task = await page.try_enqueue_background_task(cu.ECHO, {"a": "b"})
            assert task is not None
            assert await task.result(timeout=20) == {"a": "b"}

    asyncio.run(scenario())


def test_with_manual_dispatch_triggers_run_only_in_process_events(broker):
    seen: list[tuple[int, str]] = []
    with connect(str(broker.socket), dispatch="manual") as session:
        page = session.open_page("P")
        page.on_completed = lambda task_id, results: seen.append(
            (task_id, threading.current_thread().name)
        )
        tasks = [page.enqueue_background_task(cu.ECHO, {"i": str(i)}) for i in range(3)]
        for task in tasks:
            task.result(timeout=20)  # the outcomes are here ...
        assert seen == []  # ... but nothing ran: the application was busy
        selector = selectors.DefaultSelector()
        selector.register(session.events_fd(), selectors.EVENT_READ)
        assert selector.select(timeout=20)  # the fd said something is due
        selector.close()
        ran = 0
        while ran < 3:
            ran += session.process_events(timeout=5)
        me = threading.current_thread().name
        # on the caller's thread, each once (in the order the outcomes came: two ran at once)
        assert sorted(seen) == [(task.id, me) for task in tasks]
        assert session.process_events() == 0


def test_manual_dispatch_from_another_thread_keeps_taskid_first(broker):
    known: set[int] = set()
    missed: list[int] = []
    with connect(str(broker.socket), dispatch="manual") as session:
        page = session.open_page("P")
        page.on_completed = lambda task_id, results: (
            None if task_id in known else missed.append(task_id)
        )
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                session.process_events(timeout=0.05)

        runner = threading.Thread(target=loop)
        runner.start()
        try:
            for _ in range(100):
                known.add(page.enqueue_background_task(cu.NOOP).id)
        finally:
            wait_until(lambda: page.pending == 0, timeout=30)
            stop.set()
            runner.join()
    assert missed == []


@pytest.mark.parametrize("flavour", ["thread", "aio"])
def test_a_trigger_never_runs_before_the_call_that_returned_its_taskid(broker, flavour):
    """'Remember the TaskId, match it in the trigger' must never lose a cue."""
    if flavour == "thread":
        known: set[int] = set()
        missed: list[int] = []
        with broker.connect() as session:
            page = session.open_page("P")
            page.on_completed = lambda task_id, results: (
                None if task_id in known else missed.append(task_id)
            )
            for _ in range(200):
                known.add(page.enqueue_background_task(cu.NOOP).id)
            wait_until(lambda: page.pending == 0, timeout=30)
        assert missed == []
        return

    async def scenario() -> list[int]:
        known: set[int] = set()
        missed: list[int] = []
        async with await aio_client.connect(str(broker.socket)) as session:
            page = await session.open_page("P")
            page.on_completed = lambda task_id, results: (
                None if task_id in known else missed.append(task_id)
            )
            for _ in range(100):
                # through wait_for: the caller resumes a loop turn after the reply is read
                task = await asyncio.wait_for(page.enqueue_background_task(cu.NOOP), 20)
                known.add(task.id)
            await asyncio.to_thread(wait_until, lambda: page.pending == 0)
        return missed

    assert asyncio.run(scenario()) == []


def test_pending_counts_what_a_cue_waits_for(broker):
    counts: list[int] = []
    with broker.connect() as session:
        page = session.open_page("Role Center")
        page.on_pending_changed = counts.append
        tasks = [page.enqueue_background_task(cu.SLEEP, {"seconds": "0.2"}) for _ in range(3)]
        assert page.pending == 3
        for task in tasks:
            task.result(timeout=20)
        wait_until(lambda: counts and counts[-1] == 0)
        assert page.pending == 0
    assert max(counts) >= 1  # the cue showed '-' ...
    assert counts[-1] == 0  # ... until every task had ended
    assert all(a != b for a, b in itertools.pairwise(counts))  # told on change only


def test_re_enqueue_from_the_completion_trigger_refreshes_a_cue(broker):
    """BC's AutoRefresh pattern: the completion trigger enqueues the next refresh."""
    refreshes: list[str] = []
    with broker.connect() as session:
        page = session.open_page("Role Center")

        def on_completed(task_id: int, results: dict[str, str]) -> None:
            refreshes.append(results["i"])
            if len(refreshes) < 5:
                page.enqueue_background_task(cu.ECHO, {"i": str(len(refreshes))})

        page.on_completed = on_completed
        page.enqueue_background_task(cu.ECHO, {"i": "0"})
        wait_until(lambda: len(refreshes) == 5)
    assert refreshes == ["0", "1", "2", "3", "4"]


def test_a_trigger_may_wait_on_another_tasks_handle(broker):
    got: list[dict[str, str]] = []
    with broker.connect() as session:
        page = session.open_page("P")

        def on_completed(task_id: int, results: dict[str, str]) -> None:
            if results.get("step") == "first":
                second = page.enqueue_background_task(cu.ECHO, {"step": "second"})
                got.append(second.result(timeout=20))  # no deadlock with the dispatcher

        page.on_completed = on_completed
        page.enqueue_background_task(cu.ECHO, {"step": "first"})
        wait_until(lambda: got == [{"step": "second"}])


def test_connect_finds_the_server_the_way_the_server_does(broker):
    with connect(config=broker.config) as session:
        assert session.address == str(broker.socket)
        session.ping()


# --- a GUI's own loop: Tk under Xvfb ------------------------------------------------------


@pytest.fixture
def display() -> Iterator[str]:
    """A virtual X display (Debian's Xvfb, installed by scripts/test) for a real Tk window."""
    for number in range(90, 120):
        if not Path(f"/tmp/.X{number}-lock").exists():
            break
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), timeout=20)
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=20)


TK_APP = """
import sys, tkinter
from pbt_server.client import connect

root = tkinter.Tk()
label = tkinter.Label(root, text="-")
label.pack()
session = connect(sys.argv[1], dispatch="manual")
page = session.open_page("Role Center")
shown = []

def on_completed(task_id, results):
    label.config(text=results["Blocked"])  # safe: this runs on Tk's own thread
    shown.append(label.cget("text"))
    root.after(10, root.quit)

page.on_completed = on_completed
# the recipe: Tk watches the session's fd and runs what is due when it is readable
root.tk.createfilehandler(
    session.events_fd(), tkinter.READABLE, lambda fd, mask: session.process_events()
)
page.enqueue_background_task(int(sys.argv[2]), {"Blocked": "309"})
root.after(20000, root.quit)
root.mainloop()
session.close()
print("shown:", shown)
"""


def test_the_tk_recipe_fills_a_label_on_tks_own_thread(broker, display):
    done = subprocess.run(
        [sys.executable, "-c", TK_APP, str(broker.socket), str(cu.ECHO)],
        env={**os.environ, "DISPLAY": display},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "shown: ['309']" in done.stdout
