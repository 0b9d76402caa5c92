"""What the first review broke: logging after kills, dying workers, resource limits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from typing import Any

import pytest

from pbt_server.client import BackgroundTaskError, ErrorLevel, Notification, connect
from pbt_server.errors import ServerBusy, TooManyPages
from pbt_server.protocol import FrameDecoder
from tests import codeunits as cu
from tests.broker_process import alive
from tests.support import wait_until


def test_killing_a_logging_worker_does_not_silence_the_others(start_broker):
    # One shared multiprocessing-logging queue was wedged for good when a worker died
    # holding its lock; each worker has its own queue now.
    broker = start_broker({"Workers": {"Count": "2"}, "Server": {"LogLevel": "INFO"}})
    markers = [f"marker-{i}-after-a-kill" for i in range(15)]
    with broker.connect() as session:
        page = session.open_page("P")
        for marker in markers:
            with pytest.raises(BackgroundTaskError, match="timeout"):
                page.enqueue_background_task(cu.LOG_SPIN, timeout=30).result(timeout=20)
            page.enqueue_background_task(cu.LOG, {"text": marker}).result(timeout=20)
    wait_until(lambda: all(m in broker.log_text() for m in markers), timeout=20)


def test_a_task_handed_to_a_worker_that_died_meanwhile_runs_elsewhere(start_broker):
    # The job is still in the dead worker's pipe (it was frozen when it was handed the
    # task): the task never started, so it runs on the next worker instead of failing.
    broker = start_broker({"Workers": {"Count": "1"}})
    doomed = broker.worker_pids()[0]  # slot 0 (the standby comes last)
    os.kill(doomed, signal.SIGSTOP)
    try:
        with broker.connect() as session:
            innocent = session.open_page("P").enqueue_background_task(cu.CONTEXT)
            wait_until(lambda: broker.status()["workers"][0]["state"] == "starting")
            os.kill(doomed, signal.SIGKILL)
            assert int(innocent.result(timeout=20)["pid"]) != doomed
        broker.wait_for_log(f"task s{session.id}/t{innocent.id} never started there")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(doomed, signal.SIGKILL)


def test_a_worker_dying_as_it_takes_its_next_task_fails_only_a_task_it_took(start_broker):
    # The death races the next task's hand-over: either outcome is right, as long as a
    # task that fails with the worker is one it had taken off its pipe.
    broker = start_broker({"Workers": {"Count": "1"}})  # LogLevel DEBUG: takes are logged
    with broker.connect() as session:
        page = session.open_page("P")
        for _ in range(20):
            dying = page.enqueue_background_task(cu.DIE_AFTER_RETURN)
            innocent = page.enqueue_background_task(cu.CONTEXT)
            dying.exception(timeout=20)  # its result may or may not get out first
            error = innocent.exception(timeout=20)
            if error is not None:
                assert error.code == "ChildSessionCrashed"
                broker.wait_for_log(f"task s{session.id}/t{innocent.id} was taken by its worker")


def test_connections_beyond_max_connections_are_refused(start_broker):
    broker = start_broker({"Server": {"MaxConnections": "3"}})
    sessions = [broker.connect() for _ in range(3)]
    try:
        with pytest.raises(ServerBusy, match="MaxConnections"):
            connect(str(broker.socket))
        sessions.pop().close()

        def room_again() -> bool:
            try:
                connect(str(broker.socket)).close()
            except ServerBusy:
                return False
            return True

        wait_until(room_again)
    finally:
        for session in sessions:
            session.close()


def test_a_large_frame_before_hello_is_refused(broker):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(broker.socket))
        sock.sendall(struct.pack(">I", 100_000))  # fine after hello, not before
        decoder = FrameDecoder(trusted=True)
        frames: list[dict[str, Any]] = []
        while chunk := sock.recv(65536):
            frames += decoder.feed(chunk)
    assert frames[-1]["code"] == "ProtocolError"
    assert "refused" in frames[-1]["text"]


def test_open_pages_per_session_are_limited(broker):
    with broker.connect() as session:
        for i in range(1024):
            session.open_page(f"P{i}")
        with pytest.raises(TooManyPages):
            session.open_page("one too many")
        session.ping()  # the session is fine


def test_results_as_large_as_the_servers_frame_limit_reach_a_default_client(start_broker):
    broker = start_broker({"Server": {"MaxFrameBytes": str(4 << 20)}})
    with broker.connect() as session:  # the client's own default limit is 1 MiB
        page = session.open_page("P")
        results = page.enqueue_background_task(cu.BIG_RESULT, {"bytes": "2000000"}).result(20)
        assert len(results["blob"]) == 2_000_000
        assert page.enqueue_background_task(cu.NOOP).result(timeout=10) == {}


def test_a_trigger_raising_systemexit_does_not_stop_later_triggers(broker):
    done: list[int] = []
    notes: list[Notification] = []
    with broker.connect() as session:
        session.on_notification = notes.append
        page = session.open_page("P")

        def trigger(task_id: int, results: dict[str, str]) -> None:
            if task_id == 1:
                raise SystemExit(3)
            done.append(task_id)

        page.on_completed = trigger
        for _ in range(3):
            page.enqueue_background_task(cu.NOOP).result(timeout=10)
        wait_until(lambda: len(done) == 2 and notes)
    assert done == [2, 3]
    assert (notes[0].severity, notes[0].code) == (ErrorLevel.ERROR, "SystemExit")


def test_workers_keep_module_sockets_and_hold_no_client_socket(broker):
    with broker.connect() as session, broker.connect() as other:
        other.ping()
        page = session.open_page("P")
        # force a worker forked now, while two clients are connected
        running = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        wait_until(lambda: any(w["task"] for w in broker.status()["workers"]))
        running.cancel()
        for _ in range(4):  # both workers, whichever takes it
            results = page.enqueue_background_task(cu.IMPORT_SOCKET).result(timeout=10)
            assert results["echo"] == "ping"
            assert results["sockets"] == "2"  # the module's socketpair, nothing of the broker's


def test_a_task_handed_to_a_frozen_worker_runs_elsewhere(start_broker):
    # A SIGSTOPped worker never takes the job off its pipe: the task has not started (its
    # timeout never runs out), the watchdog gives the worker ACK_TIMEOUT, kills it and
    # runs the never-started task elsewhere.
    broker = start_broker({"Workers": {"Count": "1"}})
    frozen = broker.worker_pids()[0]  # slot 0 (the standby comes last)
    os.kill(frozen, signal.SIGSTOP)
    try:
        with broker.connect() as session:
            task = session.open_page("P").enqueue_background_task(cu.CONTEXT, timeout=300)
            assert int(task.result(timeout=20)["pid"]) != frozen
        wait_until(lambda: not alive(frozen))
        broker.wait_for_log("did not take the task off its pipe within 5 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
