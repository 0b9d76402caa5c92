"""The broker: parent sessions in, child sessions out, every task ending exactly once.

::

    client ──frames──▶ ClientConnection ──request──▶ Broker ──▶ Scheduler (sessions.py)
      ▲   (server.py: Unix socket 0600,                │          per-session FIFO, limits,
      │    optional TCP + AuthToken)                   │          round-robin across sessions
      │                                                ▼
      │                                        WorkerPool (pool.py) ──"run"──▶ worker process
      │                                          fork, pipes, pidfd  ◀─"started"─ (workers/main.py)
      │                                                │           ◀─"done"/"failed"─
      │                                                ▼
      └────── completed / failed / cancelled ◀── Broker ◀── Watchdog (watchdog.py)
                  (exactly one per task)              timer per running task, RSS sampling;
                                                      kills the worker's tree (proctree.py)

Lifecycle:

1. start: import codeunit modules, become child subreaper, fork ``Workers.Count`` workers
   and wait until each has opened the database (one that cannot boot fails the start), then
   listen on the Unix socket (and TCP if configured);
2. accept: a connection says ``hello`` and becomes a parent session;
3. enqueue: checked synchronously (queue full, unknown codeunit, page closed, bad
   parameters, stopping); accepted tasks wait FIFO in their session;
4. dispatch: an idle worker takes the next task, fairly across sessions;
5. ack: the worker's ``started`` arms the task's timeout timer;
6. outcome: ``done`` -> completed; ``failed`` -> failed; timer -> worker tree killed and
   replaced, ``ChildSessionTaskTimeout``; worker death -> ``ChildSessionCrashed``; RSS over
   ``MaxMemoryMB`` -> killed, ``ChildSessionMemoryLimit``; cancel (by id, record change, page
   close, disconnect) -> a running worker is killed and replaced, no trigger;
7. stop (SIGTERM, SIGINT): stop listening, cancel every task (``ServerShuttingDown``), tell
   the clients, stop the workers, remove the socket.

Every loop callback here is short and synchronous: the loop never waits on a pipe, a socket
or the disk (logging goes through a queue to a thread, see logs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pbt_server import __version__, proctree
from pbt_server.config import ServerConfig
from pbt_server.errors import (
    CANCELED_SHUTDOWN,
    TASK_CRASHED,
    TASK_MEMORY_LIMIT,
    TASK_TIMEOUT,
    TASK_TIMEOUT_TEXT,
    AuthenticationFailed,
    ProtocolError,
    ServerBusy,
    ServerShuttingDown,
)
from pbt_server.logs import BrokerLogging
from pbt_server.pool import Worker, WorkerPool
from pbt_server.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    ClosePage,
    Enqueue,
    Hello,
    OpenPage,
    Ping,
    Request,
    SetRecord,
    Status,
)
from pbt_server.report import Tally, status_report
from pbt_server.server import ClientConnection
from pbt_server.sessions import Scheduler, Session, Task, TaskState
from pbt_server.watchdog import ACK_TIMEOUT, Watchdog
from workers.database import preload
from workers.main import socket_fds
from workers.registry import Codeunit, load_modules

BOOT_TIMEOUT: Final = 60.0
SUMMARY_INTERVAL: Final = 60.0  # seconds between INFO summaries of task outcomes
FD_RESERVE: Final = 64  # fds kept free beyond client connections: listeners, log, forks
STOP_GRACE: Final = 10.0
RESULT_OVERHEAD: Final = 256  # a completed event's own fields around the results map

log = logging.getLogger("pbt_server.broker")


class Broker:
    def __init__(
        self,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        codeunits: Mapping[int, Codeunit],
        keep_sockets: frozenset[int] = frozenset(),
    ) -> None:
        self.config = config
        self.loop = loop
        limits = config.asynchronous_processing
        self.codeunits = codeunits
        self.scheduler = Scheduler(
            max_concurrency=limits.max_concurrency,
            max_queue_length=limits.max_queue_length,
            default_timeout_ms=limits.default_timeout_ms,
            max_timeout_ms=limits.max_timeout_ms,
            codeunits=self.codeunits,
            clock=loop.time,
        )
        self.pool = WorkerPool(
            loop,
            self,
            count=config.workers.count,
            database_url=config.database.url,
            max_result_bytes=config.server.max_frame_bytes - RESULT_OVERHEAD,
            max_tasks_per_worker=config.workers.max_tasks_per_worker,
            keep_sockets=keep_sockets,
        )
        self.watchdog = Watchdog(
            loop,
            max_memory_mb=config.workers.max_memory_mb,
            on_timeout=self._task_timed_out,
            on_memory=self._memory_exceeded,
            on_no_ack=self._not_acknowledged,
            workers=self.pool.workers,
        )
        self.connections: dict[int, ClientConnection] = {}  # by session id
        self.unidentified: set[ClientConnection] = set()  # before hello
        self.servers: list[asyncio.Server] = []
        self.started = time.monotonic()
        self.max_connections = config.server.max_connections
        self.stopping = False
        self.exit_code = 0
        self.tally = Tally()
        self._summary: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> int:
        proctree.become_subreaper()
        self.max_connections = _fit_fd_limit(
            self.config.server.max_connections, FD_RESERVE + 8 * self.pool.count
        )
        try:
            await self.pool.start(BOOT_TIMEOUT)
            await self._listen()
        except Exception:
            await self.pool.stop(STOP_GRACE)
            raise
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._on_signal, signum)
        log.info(
            "pbt-server %s ready: %d workers, socket %s%s",
            __version__,
            self.pool.count,
            self.config.server.socket_path,
            f", tcp {self._tcp_text()}" if self.config.server.tcp_address else "",
        )
        # What exists now lives as long as the broker: keep it out of every GC pass.
        gc.freeze()
        self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._summarize)
        await self._stop.wait()
        if self._summary is not None:
            self._summary.cancel()
        await self._shutdown()
        self._summarize()
        return self.exit_code

    def _summarize(self) -> None:
        """Log what happened to the tasks since the last summary (INFO), if anything did."""
        text = self.tally.take()
        if text:
            log.info("tasks since the last summary: %s", text)
        if not self.stopping:
            self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._summarize)

    def _on_signal(self, signum: int) -> None:
        # Only record; the loop does the work (handlers must not act, STYLE.md).
        self.loop.call_soon(self.stop, f"{signal.Signals(signum).name} received")

    def stop(self, why: str, exit_code: int = 0) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", why)
            self.exit_code = exit_code
            self._stop.set()

    async def _listen(self) -> None:
        server = self.config.server
        path = server.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            unix = await self.loop.create_unix_server(
                lambda: ClientConnection(self, max_frame=server.max_frame_bytes, tcp=False),
                str(path),
            )
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.servers.append(unix)
        if server.tcp_address is not None:
            host, port = server.tcp_address
            tcp = await self.loop.create_server(
                lambda: ClientConnection(self, max_frame=server.max_frame_bytes, tcp=True),
                host,
                port,
            )
            for sock in tcp.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.servers.append(tcp)

    def _tcp_text(self) -> str:
        address = self.config.server.tcp_address
        return f"{address[0]}:{address[1]}" if address else ""

    async def _shutdown(self) -> None:
        self.stopping = True
        self.pool.stopping = True  # workers killed from now on are not replaced
        for server in self.servers:
            server.close()
        for connection in list(self.unidentified):
            connection.close()  # connected, never said hello
        for connection in list(self.connections.values()):
            session = self.scheduler.sessions.get(connection.session_id)
            if session is not None:
                self._cancelled(self.scheduler.close_session(session), code=CANCELED_SHUTDOWN)
            connection.send(
                {
                    "op": "shutdown",
                    "code": ServerShuttingDown.code,
                    "text": "the server is stopping",
                }
            )
            connection.close()
        self.watchdog.stop()
        await self.pool.stop(STOP_GRACE)
        for server in self.servers:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.config.server.socket_path.unlink()
        log.info("stopped")

    # --- requests (server.RequestHandler) -------------------------------------------------

    def connection_made(self, connection: ClientConnection) -> None:
        if len(self.unidentified) + len(self.connections) >= self.max_connections:
            raise ServerBusy(
                f"the server has {self.max_connections} connections open (MaxConnections)"
            )
        self.unidentified.add(connection)

    def handle_request(self, connection: ClientConnection, request: Request) -> dict[str, object]:
        if isinstance(request, Hello):
            return self._hello(connection, request)
        session = self.scheduler.sessions.get(connection.session_id)
        if session is None:  # ended (server stopping) while its requests were in flight
            raise ProtocolError(f"session {connection.session_id} has ended")
        if isinstance(request, Enqueue):
            return self._enqueue(session, request)
        if isinstance(request, Cancel):
            task = self.scheduler.cancel(session, request.task)
            if task is not None:
                self._cancelled([task])
            return {"cancelled": task is not None}
        if isinstance(request, OpenPage):
            page = self.scheduler.open_page(session, request.name, request.record)
            return {"page": page.id}
        if isinstance(request, SetRecord):
            tasks = self.scheduler.set_record(session, request.page, request.record)
            return {"cancelled": self._cancelled(tasks)}
        if isinstance(request, ClosePage):
            tasks = self.scheduler.close_page(session, request.page)
            return {"cancelled": self._cancelled(tasks)}
        if isinstance(request, Ping):
            return {}
        if isinstance(request, Status):
            return self.status()
        raise ProtocolError(f"unhandled op {request.op!r}")

    def _hello(self, connection: ClientConnection, hello: Hello) -> dict[str, object]:
        if connection.session_id:
            raise ProtocolError("hello sent twice")
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello.protocol} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})"
            )
        expected = self.config.server.auth_token
        # Constant-time: the comparison must not tell an attacker how much of a guess is right.
        if connection.tcp and not hmac.compare_digest(
            hello.token.encode("utf-8"), expected.encode("utf-8")
        ):
            raise AuthenticationFailed("wrong or missing AuthToken")
        if self.stopping:
            raise ServerShuttingDown("the server is stopping")
        session = self.scheduler.open_session()
        connection.session_id = session.id
        self.unidentified.discard(connection)
        self.connections[session.id] = connection
        log.debug("session %d opened (%s)", session.id, connection.peer)
        return {
            "session": session.id,
            "server": __version__,
            "max_frame": self.config.server.max_frame_bytes,  # results may be this large
        }

    def _enqueue(self, session: Session, request: Enqueue) -> dict[str, object]:
        if self.stopping:
            raise ServerShuttingDown("the server is stopping")
        task = self.scheduler.enqueue(
            session,
            request.page,
            request.codeunit,
            request.parameters,
            request.timeout,
            request.level,
        )
        log.debug(
            "task s%d/t%d enqueued: codeunit %d, timeout %d ms",
            session.id,
            task.id,
            task.codeunit,
            task.timeout_ms,
        )
        self._dispatch()
        return {"task": task.id, "timeout": task.timeout_ms}

    def connection_lost(self, connection: ClientConnection) -> None:
        self.unidentified.discard(connection)
        session = self.scheduler.sessions.get(connection.session_id)
        self.connections.pop(connection.session_id, None)
        if session is not None:
            tasks = self.scheduler.close_session(session)
            self._cancelled(tasks)
            log.debug("session %d closed; %d task(s) cancelled", session.id, len(tasks))

    # --- outcomes -------------------------------------------------------------------------

    def _cancelled(self, tasks: list[Task], code: str | None = None) -> list[int]:
        """Tell the pages, and free the workers of tasks that were already running."""
        for task in tasks:
            reason = code or task.cancel_reason
            worker = self._worker_of(task)
            if worker is not None:
                worker.task = None
                self.pool.kill(worker, f"task s{task.session.id}/t{task.id} cancelled")
            log.debug("task s%d/t%d cancelled (%s)", task.session.id, task.id, reason)
            self.tally.add("cancelled", reason)
            self._send(
                task,
                {"op": "cancelled", "code": reason, "text": f"the task was cancelled: {reason}"},
            )
        if tasks:
            # One line, not one per task: closing a session with 10^5 waiting tasks must not
            # hold the loop for seconds of logging.
            first = tasks[0]
            log.info(
                "session %d: %s cancelled (%s)",
                first.session.id,
                f"task {first.id}" if len(tasks) == 1 else f"{len(tasks)} tasks",
                code or first.cancel_reason,
            )
            if not self.stopping:
                self._dispatch()
        return [task.id for task in tasks]

    def _worker_of(self, task: Task) -> Worker | None:
        for worker in self.pool.slots:
            if worker is not None and worker.task is task:
                return worker
        return None

    def _send(self, task: Task, event: dict[str, object]) -> None:
        connection = self.connections.get(task.session.id)
        if connection is not None:
            event["task"] = task.id
            event["page"] = task.page.id
            connection.send(event)

    def _fail(self, task: Task, code: str, text: str, stack: str = "") -> None:
        self.scheduler.finish(task, TaskState.FAILED)
        self.tally.add("failed", code)
        self._send(task, {"op": "failed", "code": code, "text": text, "stack": stack})

    def _dispatch(self) -> None:
        idle = self.pool.idle
        while idle:
            task = self.scheduler.next_task()
            if task is None:
                return
            worker = idle.popleft()
            self.pool.assign(worker, task)
            self.watchdog.expect_ack(worker)

    # --- pool events (pool.PoolListener) --------------------------------------------------

    def worker_idle(self, worker: Worker) -> None:
        if not self.stopping:
            self._dispatch()

    def task_started(self, worker: Worker, task: Task) -> None:
        self.scheduler.started(task)
        assert task.started_at is not None
        self.watchdog.arm(worker, task.started_at, task.timeout_ms)
        log.debug("task s%d/t%d started in worker %d", task.session.id, task.id, worker.pid)

    def task_done(self, worker: Worker, task: Task, results: dict[str, str]) -> None:
        self.watchdog.disarm(worker)
        self.scheduler.finish(task, TaskState.COMPLETED)
        self._send(task, {"op": "completed", "results": results})
        self.tally.add("completed", "")
        # DEBUG, not INFO: a line per completed task halves throughput (the listener thread
        # competes for the GIL); INFO gets the periodic summary instead.
        if log.isEnabledFor(logging.DEBUG):
            assert task.started_at is not None
            log.debug(
                "task s%d/t%d completed: codeunit %d, waited %.1f ms, ran %.1f ms",
                task.session.id,
                task.id,
                task.codeunit,
                (task.started_at - task.enqueued_at) * 1000,
                (self.loop.time() - task.started_at) * 1000,
            )

    def task_failed(self, worker: Worker, task: Task, code: str, text: str, stack: str) -> None:
        self.watchdog.disarm(worker)
        log.info("task s%d/t%d failed: %s: %.200s", task.session.id, task.id, code, text)
        self._fail(task, code, text, stack)

    def worker_crashed(self, worker: Worker, task: Task, how: str) -> None:
        if task.state is TaskState.STARTING and not task.requeued:
            # The worker died after its previous task, before it read this one: the codeunit
            # never started here. Run it on another worker rather than report a crash.
            log.warning(
                "worker %d %s; task s%d/t%d never started there, so it is requeued",
                worker.pid,
                how,
                task.session.id,
                task.id,
            )
            self.scheduler.requeue(task)
            self._dispatch()
            return
        text = f"the child session's worker process {worker.pid} {how}"
        log.warning("task s%d/t%d: %s", task.session.id, task.id, text)
        self._fail(task, TASK_CRASHED, text)
        self._dispatch()

    def pool_broken(self, reason: str) -> None:
        log.critical("worker pool broken: %s", reason)
        self.stop(reason, exit_code=1)

    # --- watchdog -------------------------------------------------------------------------

    def _task_timed_out(self, worker: Worker) -> None:
        task = worker.task
        assert task is not None
        worker.task = None
        self.pool.kill(worker, f"task s{task.session.id}/t{task.id} timed out")
        log.warning(
            "task s%d/t%d timed out after %d ms; worker %d killed",
            task.session.id,
            task.id,
            task.timeout_ms,
            worker.pid,
        )
        self._fail(task, TASK_TIMEOUT, TASK_TIMEOUT_TEXT)
        self._dispatch()

    def _not_acknowledged(self, worker: Worker) -> None:
        task = worker.task
        assert task is not None
        worker.task = None
        self.pool.kill(worker, "did not acknowledge its task")
        # Never started, so requeued once (worker_crashed decides); a second time, it fails.
        self.worker_crashed(worker, task, f"did not start the task within {ACK_TIMEOUT:.0f} s")

    def _memory_exceeded(self, worker: Worker, rss: int) -> None:
        task = worker.task
        if task is None:
            return
        worker.task = None
        self.pool.kill(worker, "memory limit")
        limit = self.config.workers.max_memory_mb
        text = (
            f"the child session used {rss / 2**20:.0f} MB, over the limit of {limit} MB "
            "(MaxMemoryMB); its worker was killed"
        )
        log.warning("task s%d/t%d: %s", task.session.id, task.id, text)
        self._fail(task, TASK_MEMORY_LIMIT, text)
        self._dispatch()

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return status_report(
            sessions=self.scheduler.sessions.values(),
            slots=self.pool.slots,
            standby=self.pool.standby,
            uptime=time.monotonic() - self.started,
            socket_path=str(self.config.server.socket_path),
            tcp=self._tcp_text() or None,
        )


def _fit_fd_limit(wanted_connections: int, reserve: int) -> int:
    """Raise our open-file limit toward what MaxConnections needs; return what fits.

    Running out of fds would fail the fork of a replacement worker; so connections beyond
    what the hard limit allows, less a reserve, are refused instead (ServerBusy).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = wanted_connections + reserve
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fitting = max(1, min(wanted_connections, soft - reserve))
    if fitting < wanted_connections:
        log.warning(
            "open-file limit %d allows %d connections, not MaxConnections = %d",
            soft,
            fitting,
            wanted_connections,
        )
    return fitting


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one's."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: stale
    else:
        raise RuntimeError(f"another server is listening on {path}")
    finally:
        probe.close()


def run_broker(config: ServerConfig, *, log_to_stderr: bool) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT; return its exit code."""
    logs = BrokerLogging(config.server.log_file, config.server.log_level, to_stderr=log_to_stderr)
    try:
        # Imported before the loop exists and before any fork: workers inherit the codeunits,
        # and sockets the modules open now are theirs to keep (workers close later ones).
        codeunits = load_modules(config.codeunits.modules)
        preload(config.database.url)  # e.g. psycopg: imported once here, not in every worker
        keep_sockets = frozenset(socket_fds())
        return asyncio.run(_main(config, logs, codeunits, keep_sockets))
    except Exception as err:
        log.critical(
            "pbt-server failed: %s", err, exc_info=not isinstance(err, RuntimeError | ImportError)
        )
        return 1
    finally:
        logs.close()


async def _main(
    config: ServerConfig,
    logs: BrokerLogging,
    codeunits: Mapping[int, Codeunit],
    keep_sockets: frozenset[int],
) -> int:
    broker = Broker(config, asyncio.get_running_loop(), codeunits, keep_sockets)
    broker.pool.log_handler_factory = logs.worker_handler
    return await broker.serve()
