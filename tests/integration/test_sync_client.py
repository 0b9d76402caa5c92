"""The blocking client's reading (leader/follower): who reads, and every guarantee it keeps.

A waiting caller reads the socket itself; the reader thread reads only while nobody waits.
Through all of it: triggers run one at a time, after the call that returned their TaskId;
keepalive pings notice a broker that stopped answering; a dead socket fails every waiter with
ConnectionLost; a trigger may wait for another task, or close the session.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from pbt_server.client import (
    BackgroundTask,
    BackgroundTaskCanceled,
    ClientClosed,
    ConnectionLost,
    Page,
    Session,
    connect,
)
from pbt_server.errors import CancelReason
from tests import codeunits as cu
from tests.broker_process import BrokerProcess
from tests.support import wait_until


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    """Switch threads every microsecond, so that any window a thread could slip through
    is taken often."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def readers_of(session: Session, ops: tuple[str, ...]) -> list[str]:
    """Which thread applied each broker frame of ``ops`` (the core's tap runs where frames
    are read)."""
    names: list[str] = []

    def tap(message: dict[str, Any]) -> None:
        if message["op"] in ops:
            names.append(threading.current_thread().name)

    session._core.tap = tap
    return names


def test_a_waiting_caller_reads_its_own_answers(broker: BrokerProcess) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        names = readers_of(session, ("reply", "completed"))
        for i in range(20):
            assert page.enqueue_background_task(cu.ECHO, {"i": str(i)}).result(10) == {"i": str(i)}
        assert names == ["MainThread"] * 40


def test_the_reader_thread_reads_while_nobody_waits(broker: BrokerProcess) -> None:
    done = threading.Event()
    with broker.connect() as session:
        page = session.open_page("P")
        page.on_completed = lambda task_id, results: done.set()
        names = readers_of(session, ("completed",))
        page.enqueue_background_task(cu.SLEEP, {"seconds": "0.2"})
        assert done.wait(10)  # nobody called result(): the trigger ran all the same
        assert names == ["pbt-client-reader"]


def test_triggers_run_only_after_the_call_that_returned_their_task_id(
    broker: BrokerProcess, tiny_switch_interval: None
) -> None:
    caller = threading.get_ident()
    early: list[int] = []
    ran: list[int] = []

    def trigger(task_id: int, results: dict[str, str]) -> None:
        # Still inside the enqueue call's request (waiting for its reply, or taking it)?
        # (Its last bytecodes, the return itself, may run still: no dispatcher can wait for a
        # frame to end, so the call marks its TaskId returned just before it returns.)
        frame = sys._current_frames().get(caller)
        while frame is not None:
            if frame.f_code.co_name == "_request":
                task = frame.f_locals.get("task")
                if isinstance(task, BackgroundTask) and task.id == task_id:
                    early.append(task_id)
            frame = frame.f_back
        ran.append(task_id)

    with broker.connect() as session:
        page = session.open_page("P")
        page.on_completed = trigger

        def tap(message: dict[str, Any]) -> None:
            # The enqueue's reply: hold its reader until the outcome is on the socket too, so
            # that one read brings both and the trigger is due before the call returns (unless
            # this read holds the outcome already: then nothing comes, hence the short wait).
            if message["op"] == "reply" and "timeout" in message:
                select.select([session._sock], [], [], 0.1)

        session._core.tap = tap
        tasks = [page.enqueue_background_task(cu.NOOP) for _ in range(40)]
        wait_until(lambda: len(ran) == len(tasks))
    assert early == []
    assert sorted(ran) == [task.id for task in tasks]


def test_triggers_run_one_at_a_time_in_completion_order_while_callers_read(
    broker: BrokerProcess,
) -> None:
    order: list[int] = []
    running = threading.Lock()
    overlaps: list[int] = []

    def trigger(task_id: int, results: dict[str, str]) -> None:
        if not running.acquire(blocking=False):
            overlaps.append(task_id)
            return
        try:
            order.append(task_id)
        finally:
            running.release()

    with broker.connect() as session:
        page = session.open_page("P")
        page.on_completed = trigger
        # Four threads read in turn; the triggers follow the order the outcomes arrived in,
        # whoever read them.
        seen: list[int] = []
        session._core.tap = lambda message: (
            seen.append(message["task"]) if message["op"] == "completed" else None
        )

        def lane(n: int) -> None:
            for _ in range(n):
                page.enqueue_background_task(cu.SLEEP, {"seconds": "0.01"}).result(10)

        lanes = [threading.Thread(target=lane, args=(15,)) for _ in range(4)]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        wait_until(lambda: len(order) == 60)
    assert overlaps == []
    assert order == seen


def test_many_threads_share_the_socket_each_gets_its_own_answers(broker: BrokerProcess) -> None:
    wrong: list[tuple[str, dict[str, str]]] = []
    with broker.connect() as session:
        page = session.open_page("P")

        def lane(name: str) -> None:
            for i in range(25):
                expected = {"lane": name, "i": str(i)}
                got = page.enqueue_background_task(cu.ECHO, expected).result(10)
                if got != expected:
                    wrong.append((name, got))

        lanes = [threading.Thread(target=lane, args=(f"lane {n}",)) for n in range(8)]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        session.ping()
    assert wrong == []


def test_a_leader_that_times_out_hands_the_socket_on(broker: BrokerProcess) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        slow = page.enqueue_background_task(cu.SLEEP, {"seconds": "1"})
        answers: list[dict[str, str]] = []
        follower_waiting = threading.Event()

        def follower() -> None:
            task = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
            follower_waiting.set()
            answers.append(task.result(10))

        with pytest.raises(TimeoutError):
            slow.result(timeout=0.05)  # this thread led, and gives up first
        thread = threading.Thread(target=follower)
        thread.start()
        assert follower_waiting.wait(10)
        with pytest.raises(TimeoutError):
            slow.result(timeout=0.1)  # leads again, or follows; gives up again
        thread.join(10)
        assert [answer["slept"] for answer in answers] == ["0.3"]
        assert slow.result(timeout=10)["slept"] == "1"  # the outcome waited for it


def test_a_trigger_may_wait_for_another_task(broker: BrokerProcess) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        got: list[dict[str, str]] = []
        later: list[BackgroundTask] = []

        def trigger(task_id: int, results: dict[str, str]) -> None:
            if later and task_id != later[0].id:
                got.append(later[0].result(timeout=10))  # on the dispatcher thread

        page.on_completed = trigger
        later.append(page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"}))
        page.enqueue_background_task(cu.NOOP)  # its trigger waits for the sleeper
        # Meanwhile this thread waits too: one of the two reads, the other is woken.
        long = page.enqueue_background_task(cu.SLEEP, {"seconds": "1"})
        assert long.result(timeout=10)["slept"] == "1"
        wait_until(lambda: got)
        assert got[0]["slept"] == "0.5"


def test_a_trigger_may_wait_when_nobody_else_reads(broker: BrokerProcess) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        got: list[dict[str, str]] = []
        sleeper = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.3"})
        page.on_completed = lambda task_id, results: (
            got.append(sleeper.result(timeout=10)) if task_id != sleeper.id else None
        )
        page.enqueue_background_task(cu.NOOP)
        wait_until(lambda: got)
        assert got[0]["slept"] == "0.3"


def test_close_from_a_trigger_ends_the_waiting_caller_too(broker: BrokerProcess) -> None:
    session = broker.connect()
    page = session.open_page("P")
    page.on_completed = lambda task_id, results: session.close()
    waiting = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
    page.enqueue_background_task(cu.NOOP)  # its trigger closes the session
    with pytest.raises(BackgroundTaskCanceled) as caught:
        waiting.result(timeout=10)  # this thread was reading; the close reaches it
    assert caught.value.code == CancelReason.SESSION_CLOSED
    assert session.closed
    assert isinstance(session.wait_closed(10), Exception)
    session.close()  # idempotent


@pytest.mark.parametrize("reader", [False, True], ids=["alone", "another thread reads"])
def test_a_large_request_is_sent_whole(broker: BrokerProcess, reader: bool) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        reading = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"})
        thread = threading.Thread(target=reading.result, args=(10,))
        if reader:
            thread.start()
        big = {f"k{i}": "x" * 1000 for i in range(700)}  # ~700 KB: more than one send
        assert page.enqueue_background_task(cu.ECHO, big).result(timeout=10) == big
        if reader:
            thread.join(10)
        assert reading.result(timeout=10)["slept"] == "0.5"


def _hold(broker: BrokerProcess) -> list[int]:
    """SIGSTOP the broker and its workers (a frozen host); return the pids to continue."""
    pids = [broker.pid, *broker.worker_pids()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _release(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def test_keepalive_keeps_a_quiet_session_with_a_live_broker(broker: BrokerProcess) -> None:
    with connect(str(broker.socket), keepalive=0.1) as session:
        page = session.open_page("P")
        # A caller reads for ten keepalive periods, then nobody does for ten more.
        assert page.enqueue_background_task(cu.SLEEP, {"seconds": "1"}).result(10)["slept"] == "1"
        assert session.wait_closed(timeout=1.0) is None
        session.ping()


@pytest.mark.parametrize("waiting", [True, False], ids=["a caller reads", "nobody waits"])
def test_keepalive_finds_a_broker_that_stopped_answering(start_broker: Any, waiting: bool) -> None:
    broker = start_broker()
    session = connect(str(broker.socket), keepalive=0.2)
    page = session.open_page("P")
    task = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
    held = _hold(broker)
    try:
        if waiting:
            with pytest.raises(ConnectionLost, match="did not answer a keepalive ping"):
                task.result(timeout=20)
        ended = session.wait_closed(timeout=20)
        assert isinstance(ended, ConnectionLost)
        assert "did not answer a keepalive ping within 0.2 s" in ended.text
        assert isinstance(task.exception(timeout=1), ConnectionLost)
    finally:
        _release(held)
        session.close()


def test_a_dead_broker_fails_every_waiter_with_connection_lost(start_broker: Any) -> None:
    broker = start_broker()
    session = broker.connect()
    page = session.open_page("P")
    tasks = [page.enqueue_background_task(cu.SLEEP, {"seconds": "30"}) for _ in range(3)]
    errors: list[BaseException | None] = []
    started = threading.Barrier(3)

    def wait_for(task: BackgroundTask) -> None:
        started.wait()
        errors.append(task.exception(timeout=20))

    followers = [threading.Thread(target=wait_for, args=(task,)) for task in tasks[:2]]
    for thread in followers:
        thread.start()
    started.wait()  # two threads wait (one reads, one follows); the third is this one
    os.kill(broker.pid, signal.SIGKILL)
    with pytest.raises(ConnectionLost):
        tasks[2].result(timeout=20)
    for thread in followers:
        thread.join(20)
    assert [type(error) for error in errors] == [ConnectionLost, ConnectionLost]
    assert isinstance(session.wait_closed(timeout=20), ConnectionLost)
    with pytest.raises(ConnectionLost):
        session.ping()
    session.close()
    broker.process.wait(timeout=10)


def test_a_dead_broker_is_noticed_while_nobody_waits(start_broker: Any) -> None:
    broker = start_broker()
    session = broker.connect()
    task = session.open_page("P").enqueue_background_task(cu.SLEEP, {"seconds": "30"})
    os.kill(broker.pid, signal.SIGKILL)
    assert isinstance(session.wait_closed(timeout=20), ConnectionLost)  # the reader thread saw it
    assert task.done()
    assert isinstance(task.exception(timeout=0), ConnectionLost)
    session.close()
    broker.process.wait(timeout=10)


def test_manual_dispatch_runs_triggers_only_in_process_events(broker: BrokerProcess) -> None:
    ran: list[int] = []
    with connect(str(broker.socket), dispatch="manual") as session:
        page: Page = session.open_page("P")
        page.on_completed = lambda task_id, results: ran.append(task_id)
        task = page.enqueue_background_task(cu.ECHO, {"a": "b"})
        assert task.result(timeout=10) == {"a": "b"}  # this thread read it; no trigger yet
        assert ran == []
        wait_until(lambda: session.process_events(timeout=0.1) or ran)
        assert ran == [task.id]
        assert session.process_events() == 0


def test_a_forked_child_cannot_wait_on_its_parents_handles(broker: BrokerProcess) -> None:
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.SLEEP, {"seconds": "0.5"})
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
            pid = os.fork()
        if pid == 0:  # the child: it must not read the parent's socket
            code = 3
            try:
                task.result(timeout=5)
            except ClientClosed:
                code = 0
            except BaseException:
                code = 2
            os.write(write, bytes([code]))
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == bytes([0])
        os.close(read)
        os.waitpid(pid, 0)
        assert task.result(timeout=10)["slept"] == "0.5"  # the parent's stream is intact
        session.ping()


def test_an_interrupted_enqueue_leaves_no_task_behind_and_no_session_wedged(
    start_broker: Any,
) -> None:
    """Ctrl-C while an enqueue waits for its reply: the task (accepted meanwhile) is
    cancelled, and the session's later triggers still run and close() returns."""
    broker = start_broker()
    assert broker.process is not None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with broker.connect() as session:
            page = session.open_page("P")
            fired: list[int] = []
            page.on_completed = lambda task_id, results: fired.append(task_id)
            os.kill(broker.pid, signal.SIGSTOP)  # the reply cannot come yet
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                with pytest.raises(KeyboardInterrupt):
                    page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            # the abandoned task is cancelled on the broker as soon as its id is known
            wait_until(lambda: broker.status()["totals"]["running"] == 0, timeout=20)
            later = page.enqueue_background_task(cu.ECHO, {"a": "b"})
            assert later.result(timeout=20) == {"a": "b"}
            wait_until(lambda: later.id in fired)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
