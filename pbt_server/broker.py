"""The broker: parent sessions in, child sessions out, every task ending exactly once.

::

    client ──frames──▶ ClientConnection ──request──▶ Broker ──▶ Scheduler (sessions.py)
      ▲   (server.py: Unix socket 0600,                │          per-session FIFO, limits,
      │    optional TCP + AuthToken;                   │          fairness across sessions,
      │    admission, memory budget)                   │          requeue-once rule
      │                                                ▼
      │                                        WorkerPool (pool.py) ──run──▶ worker process
      │                                          fork, pipes, pidfd, ◀─started── (workers/main.py)
      │                                          task <-> worker,    ◀─done/failed─
      │                                          kill tree, standby        │
      │                                                ▲                   │
      │                                      kill ─────┘                   │
      │                                                │                   ▼
      └────── completed / failed / cancelled ◀── Broker ◀── Watchdog (watchdog.py)
                  (exactly one per task)              one timer per task: ack deadline,
                                                      then the task's timeout; RSS sampling

Lifecycle:

1. start: import codeunit modules (pool.prepare_workers), become child subreaper, fork
   ``Workers.Count`` workers plus a standby and wait until each has opened the database (one
   that cannot boot fails the start), then listen on the Unix socket (and TCP if configured);
2. accept: a connection says ``hello`` and becomes a parent session (or an operator's
   connection, for ``status``);
3. enqueue: checked synchronously (queue full, unknown codeunit, page closed, bad
   parameters, memory budget, stopping); accepted tasks wait FIFO in their session;
4. dispatch: an idle worker takes the next task, fairly across sessions; the worker must
   acknowledge it within ``AckTimeout``, else it is killed and the task requeued once;
5. ack: the worker's ``started`` arms the task's timeout timer;
6. outcome: ``done`` -> completed; ``failed`` -> failed; timer -> worker tree killed and
   replaced, ``ChildSessionTaskTimeout``; worker death or a pipe protocol fault ->
   ``ChildSessionCrashed``; RSS over ``MaxMemoryMB`` -> killed, ``ChildSessionMemoryLimit``;
   cancel (by id, record change, page close, disconnect) -> a running worker is killed and
   replaced, no trigger. A task that left something behind in its worker gets its outcome,
   and the worker is retired before it takes another task;
7. stop (SIGTERM, SIGINT): stop listening, cancel every task (``ServerShuttingDown``), tell
   the clients, stop the workers, flush the connections for a bounded time, remove the socket.
   SIGUSR1 and SIGHUP reopen the log file (logrotate).

Every loop callback here is short and synchronous: the loop never waits on a pipe, a socket
or the disk (logging goes through a queue to a thread, see logs.py).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hmac
import logging
import os
import signal
import time
from typing import Final

from pbt_server import __version__, proctree
from pbt_server.budget import Budget
from pbt_server.codeunits import CHILD_SESSION_VARIABLE
from pbt_server.config import ServerConfig
from pbt_server.errors import (
    TASK_TIMEOUT_TEXT,
    AuthenticationFailed,
    CancelReason,
    ChildSessionCode,
    NotAllowed,
    PbtError,
    ProtocolError,
    ServerBusy,
    ServerShuttingDown,
)
from pbt_server.eventloop import loop_factory
from pbt_server.logs import BrokerLogging
from pbt_server.pool import WorkerImage, WorkerPool, prepare_workers
from pbt_server.protocol import (
    OPERATOR_OPS,
    PROTOCOL_VERSION,
    Cancelled,
    Completed,
    Enqueue,
    Failed,
    Hello,
    Message,
    Request,
    Shutdown,
)
from pbt_server.report import Tally, status_report
from pbt_server.server import FD_RESERVE, ClientConnection, Listeners, fit_fd_limit
from pbt_server.sessions import Scheduler, Session, Task, TaskState
from pbt_server.watchdog import Watchdog

BOOT_TIMEOUT: Final = 60.0
SUMMARY_INTERVAL: Final = 60.0  # seconds between INFO summaries of task outcomes
STOP_GRACE: Final = 10.0  # for workers to exit, and again for clients to read their last words
OPERATOR_RESERVE: Final = 8  # operator connections beyond MaxConnections
RESULT_OVERHEAD: Final = 256  # a completed event's own fields around the results map

log = logging.getLogger("pbt_server.broker")


class End(enum.Enum):
    """Why a task handed to a worker ended other than by the worker's own answer."""

    TIMEOUT = "timeout"
    MEMORY = "memory"
    NO_ACK = "no ack"
    CRASH = "crash"
    CANCEL = "cancel"


class Broker:
    def __init__(
        self,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        image: WorkerImage,
        logs: BrokerLogging | None = None,
        private_fds: tuple[int, ...] = (),
    ) -> None:
        self.config = config
        self.loop = loop
        self.logs = logs
        self.budget = Budget(config.server.max_buffered_mb << 20)
        self.scheduler = Scheduler(
            config.asynchronous_processing, image.codeunits, clock=loop.time, budget=self.budget
        )
        self.pool = WorkerPool(
            loop,
            self,
            config.workers,
            config.database,
            image=image,
            max_result_bytes=config.server.max_frame_bytes - RESULT_OVERHEAD,
            log_handler_factory=logs.worker_handler if logs is not None else None,
            instance=f"{config.server.pid_file}|{os.getpid()}",
            private_fds=lambda: (*private_fds, *(logs.fds() if logs is not None else ())),
        )
        self.watchdog = Watchdog(
            loop,
            ack_timeout=config.workers.ack_timeout_ms / 1000,
            max_memory_mb=config.workers.max_memory_mb,
            on_timeout=self._timed_out,
            on_no_ack=self._not_acknowledged,
            on_memory=self._over_memory,
            sample=lambda: ((task, worker.rss()) for task, worker in self.pool.running()),
        )
        self.listeners = Listeners(config.server, self.budget)
        self.connections: dict[int, ClientConnection] = {}  # by session id
        self.operators = 0
        self.started = time.monotonic()
        self.max_sessions = config.server.max_connections
        self.stopping = False
        self.exit_code = 0
        self.tally = Tally()
        self._summary: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> int:
        proctree.become_subreaper()
        # We hold the pid file's lock: whatever still carries this server's mark was left by
        # a broker that was killed hard.
        left = proctree.kill_leftovers(CHILD_SESSION_VARIABLE, f"{self.config.server.pid_file}|")
        if left:
            log.warning("killed %d process(es) a previous run left behind: %s", len(left), left)
        self.max_sessions = fit_fd_limit(
            self.config.server.max_connections,
            FD_RESERVE + OPERATOR_RESERVE + 8 * self.pool.count,
        )
        try:
            await self.pool.start(BOOT_TIMEOUT)
            await self.listeners.listen(self)
        except BaseException:
            await self.pool.stop(STOP_GRACE)
            raise
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            self.loop.add_signal_handler(signum, self._on_signal, signum)
        tcp = self.listeners.tcp_text()
        log.info(
            "pbt-server %s ready: %d workers, socket %s%s",
            __version__,
            self.pool.count,
            self.config.server.socket_path,
            f", tcp {tcp}" if tcp else "",
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
        # Only record; the loop does the work (a signal handler must not act).
        name = signal.Signals(signum).name
        if signum in (signal.SIGUSR1, signal.SIGHUP):
            self.loop.call_soon(self._reopen_log, name)
        else:
            self.loop.call_soon(self.stop, f"{name} received")

    def _reopen_log(self, why: str) -> None:
        if self.logs is not None:
            self.logs.reopen()
            log.info("log file reopened (%s)", why)

    def stop(self, why: str, exit_code: int = 0) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", why)
            self.exit_code = exit_code
            self._stop.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        self.listeners.close()
        shutdown: Shutdown = {
            "op": "shutdown",
            "code": ServerShuttingDown.code,
            "text": "the server is stopping",
        }
        for connection in list(self.connections.values()):
            session = self.scheduler.sessions.get(connection.session_id)
            if session is not None:
                tasks = self.scheduler.close_session(session)
                self._cancel_tasks(tasks, CancelReason.SERVER_SHUTTING_DOWN)
            connection.send(shutdown)
            connection.close()
        for connection in list(self.listeners.connections):
            if connection.operator:
                connection.close()
        self.watchdog.stop()
        await self.pool.stop(STOP_GRACE)
        await self.listeners.drain(STOP_GRACE)
        log.info("stopped")

    # --- requests (server.RequestHandler) -------------------------------------------------

    def handle_request(self, connection: ClientConnection, request: Request) -> Message:
        if request["op"] == "hello":
            return self._hello(connection, request)
        if connection.operator:
            if request["op"] not in OPERATOR_OPS:
                raise NotAllowed(f"an operator's connection may not send {request['op']}")
            return self.status() if request["op"] == "status" else {}
        session = self.scheduler.sessions.get(connection.session_id)
        if session is None:  # ended (server stopping) while its requests were in flight
            raise ProtocolError(f"session {connection.session_id} has ended")
        match request["op"]:
            case "enqueue":
                return self._enqueue(session, request)
            case "cancel":
                task = self.scheduler.cancel(session, request["task"])
                if task is not None:
                    self._cancel_tasks([task])
                return {"cancelled": task is not None}
            case "open_page":
                page = self.scheduler.open_page(session, request["name"], request["record"])
                return {"page": page.id}
            case "set_record":
                tasks = self.scheduler.set_record(session, request["page"], request["record"])
                return {"cancelled": self._cancel_tasks(tasks)}
            case "close_page":
                tasks = self.scheduler.close_page(session, request["page"])
                return {"cancelled": self._cancel_tasks(tasks)}
            case "ping":
                return {}
            case "status":
                return self.status()
        raise ProtocolError(f"unhandled op {request['op']!r}")

    def _hello(self, connection: ClientConnection, hello: Hello) -> Message:
        if connection.identified:
            raise ProtocolError("hello sent twice")
        if hello["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello['protocol']} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})"
            )
        expected = self.config.server.auth_token
        # Constant-time: the comparison must not tell an attacker how much of a guess is right.
        if connection.tcp and not hmac.compare_digest(
            hello.get("token", "").encode("utf-8"), expected.encode("utf-8")
        ):
            raise AuthenticationFailed("wrong or missing AuthToken")
        reply: Message = {"server": __version__, "max_frame": self.config.server.max_frame_bytes}
        if hello.get("operator", False):
            if self.operators >= OPERATOR_RESERVE:
                raise ServerBusy(f"{OPERATOR_RESERVE} operator connections are open already")
            self.operators += 1
            connection.operator = True
            return {"session": 0, **reply}
        if self.stopping:
            raise ServerShuttingDown("the server is stopping")
        if len(self.connections) >= self.max_sessions:
            raise ServerBusy(f"the server has {self.max_sessions} sessions open (MaxConnections)")
        session = self.scheduler.open_session(hello.get("context"))
        connection.session_id = session.id
        self.connections[session.id] = connection
        log.debug("session %d opened (%s)", session.id, connection.peer)
        return {"session": session.id, **reply}

    def _enqueue(self, session: Session, request: Enqueue) -> Message:
        if self.stopping:
            raise ServerShuttingDown("the server is stopping")
        task = self.scheduler.enqueue(
            session,
            request["page"],
            request["codeunit"],
            request["parameters"],
            request["timeout"],
            request["level"],
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
        if connection.operator:
            self.operators -= 1
            return
        session = self.scheduler.sessions.get(connection.session_id)
        self.connections.pop(connection.session_id, None)
        if session is not None:
            tasks = self.scheduler.close_session(session)
            self._cancel_tasks(tasks)
            log.debug("session %d closed; %d task(s) cancelled", session.id, len(tasks))

    # --- outcomes -------------------------------------------------------------------------

    def _send(self, task: Task, event: Completed | Failed | Cancelled) -> None:
        connection = self.connections.get(task.session.id)
        if connection is not None:
            connection.send(event)

    def _fail(self, task: Task, code: str, text: str, stack: str = "") -> None:
        self.scheduler.finish(task, TaskState.FAILED)
        self.tally.add("failed", code)
        failed: Failed = {
            "op": "failed",
            "task": task.id,
            "page": task.page.id,
            "code": code,
            "text": text,
            "stack": stack,
        }
        self._send(task, failed)

    def _cancel_tasks(self, tasks: list[Task], reason: str | None = None) -> list[int]:
        """Tell the pages, and end the tasks that were already running (no trigger runs)."""
        for task in tasks:
            code = reason or task.cancel_reason
            if self.pool.worker_of(task) is not None:
                self._end_running(task, End.CANCEL, f"cancelled ({code})")
            log.debug("task s%d/t%d cancelled (%s)", task.session.id, task.id, code)
            self.tally.add("cancelled", code)
            cancelled: Cancelled = {
                "op": "cancelled",
                "task": task.id,
                "page": task.page.id,
                "code": code,
                "text": f"the task was cancelled: {code}",
            }
            self._send(task, cancelled)
        if tasks:
            # One line, not one per task: closing a session with 10^5 waiting tasks must not
            # hold the loop for seconds of logging.
            first = tasks[0]
            log.info(
                "session %d: %s cancelled (%s)",
                first.session.id,
                f"task {first.id}" if len(tasks) == 1 else f"{len(tasks)} tasks",
                reason or first.cancel_reason,
            )
            if not self.stopping:
                self._dispatch()
        return [task.id for task in tasks]

    def _end_running(self, task: Task, cause: End, text: str) -> None:
        """A task handed to a worker ends without the worker's answer, for any cause.

        The watchdog's timer goes; the worker is killed (a crashed one is dead already) and
        its slot refilled; then the task fails, is requeued (it never started, so it may run
        elsewhere, once), or — for a cancel — was already cancelled by the scheduler.
        """
        self.watchdog.disarm(task)
        if cause is not End.CRASH:
            self.pool.abort(task, f"task s{task.session.id}/t{task.id}: {text}")
        match cause:
            case End.CANCEL:
                return
            case End.TIMEOUT:
                log.warning(
                    "task s%d/t%d timed out after %d ms; its worker was killed",
                    task.session.id,
                    task.id,
                    task.timeout_ms,
                )
                self._fail(task, ChildSessionCode.TASK_TIMEOUT, TASK_TIMEOUT_TEXT)
            case End.MEMORY:
                log.warning("task s%d/t%d: %s", task.session.id, task.id, text)
                self._fail(task, ChildSessionCode.MEMORY_LIMIT, text)
            case End.NO_ACK | End.CRASH:
                if self.scheduler.worker_lost(task):
                    log.warning(
                        "%s; task s%d/t%d never started there, so it is requeued",
                        text,
                        task.session.id,
                        task.id,
                    )
                else:
                    log.warning("task s%d/t%d: %s", task.session.id, task.id, text)
                    self._fail(task, ChildSessionCode.CRASHED, text)
        self._dispatch()

    def _dispatch(self) -> None:
        pool = self.pool
        while pool.has_idle:
            task = self.scheduler.next_task()
            if task is None:
                return
            pool.assign(task)
            self.watchdog.expect_ack(task)

    # --- pool events (pool.PoolListener) --------------------------------------------------

    def capacity_freed(self) -> None:
        if not self.stopping:
            self._dispatch()

    def task_started(self, task: Task) -> None:
        self.scheduler.started(task)
        self.watchdog.arm(task)
        if log.isEnabledFor(logging.DEBUG):
            worker = self.pool.worker_of(task)
            pid = worker.pid if worker is not None else 0
            log.debug("task s%d/t%d started in worker %d", task.session.id, task.id, pid)

    def task_done(self, task: Task, results: dict[str, str]) -> None:
        self.watchdog.disarm(task)
        self.scheduler.finish(task, TaskState.COMPLETED)
        completed: Completed = {
            "op": "completed",
            "task": task.id,
            "page": task.page.id,
            "results": results,
        }
        self._send(task, completed)
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
        self._dispatch()

    def task_failed(self, task: Task, code: str, text: str, stack: str) -> None:
        self.watchdog.disarm(task)
        log.info("task s%d/t%d failed: %s: %.200s", task.session.id, task.id, code, text)
        self._fail(task, code, text, stack)
        self._dispatch()

    def task_lost(self, task: Task, how: str, *, started_elsewhere_ok: bool) -> None:
        if started_elsewhere_ok:
            self._end_running(task, End.CRASH, how)
        else:
            self.watchdog.disarm(task)
            log.warning("task s%d/t%d: %s", task.session.id, task.id, how)
            self._fail(task, ChildSessionCode.CRASHED, how)
            self._dispatch()

    def pool_broken(self, reason: str) -> None:
        log.critical("worker pool broken: %s", reason)
        self.stop(reason, exit_code=1)

    # --- watchdog -------------------------------------------------------------------------

    def _timed_out(self, task: Task) -> None:
        self._end_running(task, End.TIMEOUT, "timed out")

    def _not_acknowledged(self, task: Task) -> None:
        ack = self.config.workers.ack_timeout_ms / 1000
        self._end_running(task, End.NO_ACK, f"its worker did not start the task within {ack:g} s")

    def _over_memory(self, task: Task, rss: int) -> None:
        limit = self.config.workers.max_memory_mb
        text = (
            f"the child session used {rss / 2**20:.0f} MB, over the limit of {limit} MB "
            "(MaxMemoryMB); its worker was killed"
        )
        self._end_running(task, End.MEMORY, text)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> Message:
        return status_report(
            sessions=self.scheduler.sessions.values(),
            pool=self.pool,
            uptime=time.monotonic() - self.started,
            socket_path=str(self.config.server.socket_path),
            tcp=self.listeners.tcp_text() or None,
        )


def run_broker(
    config: ServerConfig, *, log_to_stderr: bool, private_fds: tuple[int, ...] = ()
) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT; return its exit code.

    ``private_fds`` are the caller's fds no worker may inherit (the pid file's lock).
    """
    logs = BrokerLogging(config.server.log_file, config.server.log_level, to_stderr=log_to_stderr)
    try:
        # Before the loop exists and before any fork: workers inherit what this imports.
        image = prepare_workers(config.codeunits, config.database)
        factory = loop_factory(config.server.event_loop)
        log.info("event loop: %s", "asyncio" if factory is None else "uvloop")
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_main(config, logs, image, private_fds))
    except (PbtError, ImportError, OSError) as err:
        log.critical("pbt-server failed: %s", err)
        return 1
    except Exception as err:
        log.critical("pbt-server failed: %s", err, exc_info=True)
        return 1
    finally:
        logs.close()


async def _main(
    config: ServerConfig, logs: BrokerLogging, image: WorkerImage, private_fds: tuple[int, ...]
) -> int:
    broker = Broker(config, asyncio.get_running_loop(), image, logs, private_fds)
    return await broker.serve()
