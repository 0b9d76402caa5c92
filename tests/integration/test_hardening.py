"""What hostile or careless clients, operators and codeunit modules cannot do to the broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pbt_server.client import (
    ClientClosed,
    ConnectionLost,
    MemoryBudgetExceeded,
    PbtError,
    ServerBusy,
    connect,
)
from pbt_server.client import aio as aio_client
from pbt_server.protocol import encode_frame
from tests import codeunits as cu
from tests.broker_process import REPO, BrokerProcess, alive
from tests.support import wait_until

TOKEN = "hardening-token-0123456789"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pbt_server", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def _sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


# --- stopping -----------------------------------------------------------------------------


def test_stop_finishes_within_its_grace_when_a_client_stopped_reading(start_broker):
    broker = start_broker({"Workers": {"Count": "2"}})
    with _sockets() as opened:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(broker.socket))
        sock.sendall(encode_frame({"op": "hello", "rid": 1, "protocol": 1}))
        sock.sendall(encode_frame({"op": "open_page", "rid": 2, "name": "P", "record": ""}))
        for rid in range(3, 40):  # ~33 MB of results for a client that reads none of them
            enqueue = {
                "op": "enqueue",
                "rid": rid,
                "page": 1,
                "codeunit": cu.BIG_RESULT,
                "parameters": {"bytes": "900000"},
                "timeout": None,
                "level": "Error",
            }
            sock.sendall(encode_frame(enqueue))

        def all_sent_to_a_peer_that_reads_nothing() -> bool:
            sessions = broker.status()["sessions"]
            return bool(sessions) and all((s["waiting"], s["running"]) == (0, 0) for s in sessions)

        wait_until(all_sent_to_a_peer_that_reads_nothing, timeout=60)
        assert broker.process is not None
        broker.process.send_signal(signal.SIGTERM)
        # The broker gives clients a short grace to read, then aborts them and exits.
        assert broker.process.wait(timeout=30) == 0
    broker.wait_for_log("did not read what it was sent; aborted")


# --- admission ----------------------------------------------------------------------------


def test_silent_tcp_connections_cannot_lock_out_sessions(start_broker):
    broker = start_broker({"Server": {"TcpAddress": "127.0.0.1:0", "AuthToken": TOKEN}})
    host, port = _tcp_address(broker)
    with _sockets() as opened, broker.connect() as bystander:
        for _ in range(300):  # one peer that never says hello: half the budget, then 16
            sock = socket.socket()
            opened.append(sock)
            sock.connect((host, port))
        opened[-1].settimeout(10)
        assert b"ServerBusy" in opened[-1].recv(4096)  # the flood is turned away at once
        # a client with the token from another address gets in, and so do the sessions of
        # the Unix socket and an operator's status
        assert _tcp_hello((host, port), "127.0.0.2")["op"] == "reply"  # a session
        bystander.ping()
        with broker.connect() as session:
            session.ping()
        assert _cli("status", "--config", str(broker.config)).returncode == 0
    broker.wait_for_log("connections from 127.0.0.1 have not said hello yet")


def test_silent_connections_from_many_addresses_cannot_lock_out_a_client(start_broker):
    """Every place before hello taken, by 128 connections from one address and 16 from each
    of eight more: a client that says hello at once still gets in, displacing the oldest."""
    broker = start_broker({"Server": {"TcpAddress": "127.0.0.1:0", "AuthToken": TOKEN}})
    host, port = _tcp_address(broker)
    with _sockets() as opened:
        sources = ["127.0.0.1"] * 128 + [f"127.0.0.{n}" for n in range(2, 10) for _ in range(16)]
        for source in sources:
            sock = socket.socket()
            opened.append(sock)
            sock.bind((source, 0))
            sock.connect((host, port))
        # One more from the first address is turned away at once: the broker has taken in
        # every connection before it (it accepts in order), and every place is taken.
        probe = socket.socket()
        opened.append(probe)
        probe.connect((host, port))
        probe.settimeout(10)
        assert b"connections from 127.0.0.1 have not said hello yet" in probe.recv(4096)
        assert _tcp_hello((host, port), "127.0.0.10")["op"] == "reply"
        opened[0].settimeout(10)
        assert b"displaced by a newer connection" in opened[0].recv(4096)


def _tcp_hello(address: tuple[str, int], source: str) -> dict[str, object]:
    from pbt_server.protocol import FrameDecoder

    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(encode_frame({"op": "hello", "rid": 1, "protocol": 1, "token": TOKEN}))
        decoder = FrameDecoder()
        while True:
            frames = list(decoder.feed(sock.recv(65536)))
            if frames:
                return frames[0]


def _tcp_address(broker: BrokerProcess) -> tuple[str, int]:
    tcp = broker.status()["server"]["tcp"]
    host, _, port = tcp.rpartition(":")
    return host, int(port)


def test_an_operator_can_ask_for_status_and_health_when_the_server_is_full(start_broker):
    broker = start_broker({"Server": {"MaxConnections": "2"}})
    with broker.connect(), broker.connect():
        with pytest.raises(ServerBusy, match="MaxConnections"):
            broker.connect()
        status = _cli("status", "--json", "--config", str(broker.config))
        assert status.returncode == 0, status.stderr
        assert '"sessions"' in status.stdout
        health = _cli("health", "--config", str(broker.config))
        assert (health.returncode, health.stdout.strip()) == (0, "healthy")


def test_health_and_status_say_when_no_server_answers(tmp_path):
    ini = tmp_path / "server.ini"
    ini.write_text(f"[Server]\nSocketPath = {tmp_path}/nobody.sock\n")
    health = _cli("health", "--config", str(ini))
    assert health.returncode == 1
    assert f"{tmp_path}/nobody.sock" in health.stdout
    status = _cli("status", "--config", str(ini))
    assert status.returncode == 1
    assert f"no answer on {tmp_path}/nobody.sock" in status.stdout


# --- memory ---------------------------------------------------------------------------------


def test_partial_frames_cannot_spend_more_than_the_memory_budget(start_broker):
    broker = start_broker({"Server": {"MaxBufferedMB": "2", "MaxFrameBytes": "1048576"}})
    with _sockets() as opened:
        answers = []
        for _ in range(6):  # each announces ~1 MB and sends a little of it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened.append(sock)
            sock.connect(str(broker.socket))
            sock.sendall(encode_frame({"op": "hello", "rid": 1, "protocol": 1}))
            sock.sendall(struct.pack(">I", 1_000_000) + b"\x81")
            answers.append(_read_until_quiet(sock))
        refused = [b"ServerMemoryBudget" in answer for answer in answers]
        assert refused == [False, False, True, True, True, True]  # two fit; the rest are told
        with broker.connect() as session:  # the broker is fine, and so are others
            page = session.open_page("P")
            assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=20)


def _read_until_quiet(sock: socket.socket) -> bytes:
    """What the broker says until it closes the connection or falls silent for 1 s."""
    sock.settimeout(1)
    data = b""
    with contextlib.suppress(TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_waiting_parameters_cannot_spend_more_than_the_memory_budget(start_broker):
    broker = start_broker(
        {
            "Server": {"MaxBufferedMB": "1"},
            "Workers": {"Count": "1"},
            "AsynchronousProcessing": {"ChildSessionsMaxConcurrency": "1"},
        }
    )
    big = {"blob": "x" * 200_000}
    with broker.connect() as session:
        page = session.open_page("P")
        blocker = page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
        accepted = []
        refusal: MemoryBudgetExceeded | None = None
        for _ in range(20):
            try:
                accepted.append(page.enqueue_background_task(cu.ECHO, big))
            except MemoryBudgetExceeded as err:
                refusal = err
                break
        assert refusal is not None
        assert refusal.code == "ServerMemoryBudget"
        assert 2 <= len(accepted) <= 5
        assert page.try_enqueue_background_task(cu.ECHO, big) is None
        assert page.last_enqueue_error is not None
        assert page.last_enqueue_error.code == "ServerMemoryBudget"
        blocker.cancel()
        assert [t.result(timeout=20) == big for t in accepted] == [True] * len(accepted)
        assert page.enqueue_background_task(cu.ECHO, big).result(timeout=20) == big


# --- signals and the log file --------------------------------------------------------------


def test_sigusr1_reopens_the_log_file_after_logrotate_renamed_it(start_broker):
    broker = start_broker({"Server": {"LogLevel": "INFO"}})
    rotated = broker.log.with_name("pbt.log.1")
    broker.log.rename(rotated)
    assert broker.process is not None
    os.kill(broker.pid, signal.SIGUSR1)
    wait_until(broker.log.exists)  # the broker says it reopened the file, in the new file
    with broker.connect() as session:
        page = session.open_page("P")
        page.enqueue_background_task(cu.LOG, {"text": "after-the-rotation"}).result(timeout=20)
    wait_until(lambda: "after-the-rotation" in broker.log.read_text())
    assert "after-the-rotation" not in rotated.read_text()
    assert "log file reopened" in broker.log.read_text()
    assert broker.process.poll() is None


def test_the_log_file_is_not_followed_through_a_symlink(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("do not append here\n")
    link = tmp_path / "pbt.log"
    link.symlink_to(target)
    with pytest.raises(AssertionError, match="symbolic link"):
        BrokerProcess.start({"Server": {"LogFile": str(link)}})
    assert target.read_text() == "do not append here\n"


def test_a_full_disk_costs_one_line_on_stderr_not_a_traceback_per_record(start_broker):
    broker = start_broker({"Server": {"LogFile": "/dev/full", "LogLevel": "DEBUG"}})
    with broker.connect() as session:
        page = session.open_page("P")
        for _ in range(50):
            page.enqueue_background_task(cu.NOOP).result(timeout=20)
    stderr = (broker.directory / "stderr.txt").read_text()
    assert stderr.count("cannot write /dev/full") == 1  # said once, then records are dropped
    assert "Traceback" not in stderr
    assert "Logging error" not in stderr


# --- codeunit modules and the start ------------------------------------------------------


def test_a_module_that_exits_at_import_fails_the_start_with_its_reason(tmp_path):
    with pytest.raises(AssertionError, match=r"exited with 1") as caught:
        BrokerProcess.start({"Codeunits": {"Modules": "tests.modules.exits_at_import"}})
    assert "called sys.exit(0) while being imported" in str(caught.value)


def test_a_module_that_starts_a_thread_at_import_is_reported(start_broker):
    broker = start_broker(
        {"Codeunits": {"Modules": "tests.codeunits, tests.modules.thread_at_import"}}
    )
    broker.wait_for_log("started thread 'poller' at import")


def test_a_low_open_file_limit_is_reported_at_start(start_broker):
    broker = start_broker(nofile=200)
    broker.wait_for_log("allows only")
    broker.wait_for_log("not MaxConnections = 4096")


def test_a_world_writable_socket_directory_is_reported(start_broker, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may write here (and it is not sticky, as /tmp is)
    broker = start_broker({"Server": {"SocketPath": str(shared / "pbt.sock")}})
    broker.wait_for_log("writable by every user")


# --- clients ------------------------------------------------------------------------------


def test_a_cancelled_asyncio_enqueue_cancels_its_task(start_broker):
    broker = start_broker(
        {"AsynchronousProcessing": {"ChildSessionsMaxQueueLength": "5"}, "Workers": {"Count": "1"}}
    )

    async def scenario() -> None:
        session = await aio_client.connect(str(broker.socket))
        try:
            page = await session.open_page("P")
            for _ in range(50):
                call = asyncio.ensure_future(
                    page.enqueue_background_task(cu.SLEEP, {"seconds": "30"})
                )
                await asyncio.sleep(0)  # sent; its reply not read yet
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call

            def nothing_left() -> bool:
                rows = [s for s in broker.status()["sessions"] if s["id"] == session.id]
                return rows == [] or (rows[0]["waiting"], rows[0]["running"]) == (0, 0)

            await asyncio.to_thread(wait_until, nothing_left)
            task = await page.enqueue_background_task(cu.ECHO, {"a": "b"})
            assert await task.result(timeout=20) == {"a": "b"}  # no QueueFull: no orphans
        finally:
            await session.close()

    asyncio.run(scenario())


def test_a_session_used_in_a_forked_child_refuses_and_leaves_the_parent_alone(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        pid = os.fork()
        if pid == 0:  # the child: its copy of the session must not touch the connection
            code = 0
            try:
                session.ping()
                code = 1
            except ClientClosed:
                pass
            session.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert page.enqueue_background_task(cu.ECHO, {"a": "b"}).result(timeout=20) == {"a": "b"}


def test_a_frozen_broker_fails_pending_handles_through_the_keepalive(start_broker):
    broker = start_broker()
    with connect(str(broker.socket), keepalive=0.5) as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.SLEEP, {"seconds": "5"})
        assert broker.process is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ConnectionLost, match="keepalive ping"):
                task.result(timeout=20)
        finally:
            os.kill(broker.pid, signal.SIGCONT)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_a_stream_that_ends_inside_a_frame_is_reported_as_truncated(tmp_path, flavour):
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.recv(4096)  # the hello
            reply = encode_frame(
                {"op": "reply", "rid": 1, "session": 1, "server": "x", "max_frame": 1 << 20}
            )
            peer.sendall(reply + struct.pack(">I", 100) + b"\x81\xa2op")  # then a cut frame

    import threading

    server = threading.Thread(target=serve)
    server.start()
    try:
        if flavour == "sync":
            session = connect(path, keepalive=None)
            error = session.wait_closed(timeout=10)
            session.close()
        else:

            async def run() -> PbtError:
                session = await aio_client.connect(path, keepalive=None)
                error = await session.wait_closed()
                await session.close()
                return error

            error = asyncio.run(run())
    finally:
        server.join()
        listener.close()
    assert isinstance(error, ConnectionLost)
    assert "ended inside a frame" in error.text
    assert "truncated" in error.text


def test_workers_do_not_hold_the_brokers_epoll(broker):
    with broker.connect() as session:
        page = session.open_page("P")
        pid = int(page.enqueue_background_task(cu.CONTEXT).result(timeout=20)["pid"])
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [link for link in links if "eventpoll" in link], links
    assert alive(pid)


def test_from_pbt_server_import_codeunit_works_beside_a_workers_package_of_ones_own(tmp_path):
    project = tmp_path / "app"
    (project / "workers").mkdir(parents=True)
    (project / "workers" / "__init__.py").write_text("# the application's own package\n")
    (project / "cues.py").write_text(
        "from pbt_server import CodeunitError, codeunit\n\n"
        "@codeunit(777, name='Cue')\n"
        "def cue(ctx):\n"
        "    return {'ok': 'yes'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import cues, workers; print(cues.cue(None), workers.__file__)"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "{'ok': 'yes'}" in done.stdout
    assert str(project / "workers") in done.stdout  # theirs, not shadowed by ours
