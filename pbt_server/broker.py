"""The broker: parent sessions in, child sessions out, every task ending exactly once.

::

    client ──frames──▶ ClientConnection ──request──▶ Broker ──▶ Scheduler (sessions.py)
      ▲   (server.py: Unix socket 0600,                │          per-session FIFO, limits,
      │    optional TCP + AuthToken;                   │          fairness across sessions,
      │    admission, memory budget)                   │          requeue-once rule
      │                                                ▼
      │                                        WorkerPool (pool.py) ──run──▶ worker process
      │                                          fork, pipes, pidfd,           (workers/main.py)
      │                                          task <-> worker,    ◀─done/failed─
      │                                          kill tree, standby        │
      │                                                ▲                   │
      │                                      kill ─────┘                   │
      │                                                │                   ▼
      └────── completed / failed / cancelled ◀── Broker ◀── Watchdog (watchdog.py)
                  (exactly one per task)              one timer per task: the deadline
                                                      (or ack deadline), then the timeout;
                                                      RSS sampling

Lifecycle:

1. start: import codeunit modules (pool.prepare_workers), become child subreaper, fork
   ``Workers.Count`` workers plus a standby and wait until each has opened the database (one
   that cannot boot fails the start), then listen on the Unix socket (and TCP if configured);
2. accept: a connection says ``hello`` and becomes a parent session (or an operator's
   connection, for ``status``);
3. enqueue: checked synchronously (queue full, unknown codeunit, page closed, bad
   parameters, memory budget, stopping); accepted tasks wait FIFO in their session;
4. dispatch: an idle worker is handed the next task, fairly across sessions; the task's
   clock starts there (the queue wait never counts);
5. ack: the worker sends nothing at the start. At the task's deadline (or ``AckTimeout``,
   if sooner) the watchdog asks whether the worker took the job off its pipe: taken, the
   timeout runs on; still there at ``AckTimeout``, the worker is killed and the task
   requeued once (it never started);
6. outcome: ``done`` -> completed; ``failed`` -> failed; timer -> worker tree killed and
   replaced, ``ChildSessionTaskTimeout``; worker death or a pipe protocol fault ->
   ``ChildSessionCrashed``; RSS over ``MaxMemoryMB`` -> killed, ``ChildSessionMemoryLimit``;
   cancel (by id, record change, page close, disconnect) -> no trigger; a running task's
   slot gets the standby at once, and its worker is killed only if the task runs on past
   ``CancelGrace`` (its answer is dropped; a worker that ends in time is reused). A task
   that left something behind in its worker gets its outcome, and the worker is retired
   before it takes another task;
7. stop (SIGTERM, SIGINT): stop listening, cancel every task (``ServerShuttingDown``), tell
   the clients, stop the workers, flush the connections for a bounded time, remove the socket.
   SIGUSR1 reopens the log file (logrotate);
8. reload (``pbt-server reload``, SIGHUP, ``run --reload``): reloading.py re-reads server.ini
   and tries the codeunit modules in a fresh process; :meth:`Broker.apply` then takes the new
   settings and code for every later task, losing none.

Every loop callback here is short and synchronous: the loop never waits on a pipe, a socket
or the disk (logging goes through a queue to a thread, see logs.py).

With ``[Server] MetricsAddress``, operations.py serves ``/metrics``, ``/health`` and the live
dashboard from threads of its own; the broker feeds its Telemetry (telemetry.py) one call
per task outcome (``_send``) and the pool one per worker it ends, with the cause.
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pbt_server import __version__, proctree, systemd
from pbt_server.budget import Budget
from pbt_server.cache import ResultCache, Version, sqlite_version
from pbt_server.codeunits import CHILD_SESSION_VARIABLE, Sharing
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
from pbt_server.events import Event, event, task_event
from pbt_server.logs import BrokerLogging
from pbt_server.pool import WorkerImage, WorkerPool, prepare_workers
from pbt_server.progress import BACKLOG, ProgressRelay
from pbt_server.protocol import (
    OPERATOR_OPS,
    PROTOCOL_VERSION,
    Cancelled,
    Completed,
    Enqueue,
    Failed,
    Hello,
    Message,
    Progress,
    Request,
    Shutdown,
)
from pbt_server.reloading import Reloader, consume
from pbt_server.report import Tally, status_report
from pbt_server.server import (
    FD_RESERVE,
    PENDING_PER_LISTENER,
    Answer,
    ClientConnection,
    Listeners,
    fit_fd_limit,
)
from pbt_server.sessions import Scheduler, Session, Task, TaskState
from pbt_server.watchdog import Watchdog

if TYPE_CHECKING:
    from pbt_server.operations import OperationsServer
    from pbt_server.telemetry import Telemetry

BOOT_TIMEOUT: Final = 60.0
SUMMARY_INTERVAL: Final = 60.0  # seconds between INFO summaries of task outcomes
STOP_GRACE: Final = 10.0  # for idle workers to exit
FLUSH_GRACE: Final = 2.0  # for clients to read their last words; then they are cut off
OPERATOR_RESERVE: Final = 8  # operator connections beyond MaxConnections
METRICS_REQUESTS: Final = 16  # operations.MAX_REQUESTS: what the endpoint serves at once
RESULT_OVERHEAD: Final = 256  # a completed event's own fields around the results map

log = logging.getLogger("pbt_server.broker")


class End(enum.Enum):
    """Why a task handed to a worker ended other than by the worker's own answer (a
    timeout is ended by ``_task_timeout``, after its worker's stack dump)."""

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
        *,
        watch: bool = False,
    ) -> None:
        self.config = config
        self.loop = loop
        self.logs = logs
        self.budget = Budget(config.server.max_buffered_mb << 20)
        self.scheduler = Scheduler(
            config.asynchronous_processing,
            image.codeunits,
            clock=loop.time,
            budget=self.budget,
            sharing=_sharing(image),
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
            taken=self.pool.taken,
            on_started=self._found_started,
            on_timeout=self._timed_out,
            on_no_ack=self._not_acknowledged,
            on_memory=self._over_memory,
            sample=lambda: ((task, worker.rss()) for task, worker in self.pool.running()),
        )
        self.listeners = Listeners(config.server, self.budget)
        self.cache = ResultCache(config.workers.result_cache_mb << 20, _data_version(config))
        self.scheduler.cache = self.cache
        self.progress = ProgressRelay(
            loop, config.asynchronous_processing.progress_interval_ms / 1000, self._send_progress
        )
        self.connections: dict[int, ClientConnection] = {}  # by session id
        self.operators = 0
        self.started = time.monotonic()
        self.max_sessions = config.server.max_connections
        self.stopping = False
        self.exit_code = 0
        self.tally = Tally()
        self._summary: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self.reloader = Reloader(self)
        self._watch = watch  # run --reload: reload when a module file changes
        # [Server] MetricsAddress: counts for Prometheus and the dashboard (operations.py).
        # Off, none of it is imported and each hook below costs one attribute check.
        self.telemetry: Telemetry | None = None
        self.operations: OperationsServer | None = None
        if config.server.metrics_address is not None:
            from pbt_server.operations import OperationsServer  # needs pbt-server[metrics]

            self.operations = OperationsServer(self, config.server.metrics_address)
            self.telemetry = self.operations.telemetry
            self.pool.on_worker_ended = self.telemetry.worker_ended

    # --- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> int:
        proctree.become_subreaper()
        # We hold the pid file's lock: whatever still carries this server's mark was left by
        # a broker that was killed hard.
        left = proctree.kill_leftovers(CHILD_SESSION_VARIABLE, f"{self.config.server.pid_file}|")
        if left:
            log.warning("killed %d process(es) a previous run left behind: %s", len(left), left)
        self.max_sessions = fit_fd_limit(
            self.config.server.max_connections, _fd_reserve(self.pool.count)
        )
        try:
            await self.pool.start(BOOT_TIMEOUT)
            await self.listeners.listen(self)
            if self.operations is not None:
                self.operations.start()
        except BaseException:
            await self.pool.stop(STOP_GRACE)
            raise
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            self.loop.add_signal_handler(signum, self._on_signal, signum)
        tcp = self.listeners.tcp_text()
        systemd.ready(f"{self.pool.count} workers, socket {self.config.server.socket_path}")
        event(
            log,
            logging.INFO,
            Event.READY,
            "pbt-server %s ready: %d workers, socket %s%s",
            __version__,
            self.pool.count,
            self.config.server.socket_path,
            f", tcp {tcp}" if tcp else "",
        )
        if not self.cache.enabled and any(s.cache for s in self.scheduler.sharing.values()):
            log.warning(
                "cache=True codeunits are shared but not cached: %s",
                "ResultCacheMB = 0"
                if self.cache.limit == 0
                else "the database has no data version the broker can read (PostgreSQL)",
            )
        # What exists now lives as long as the broker: keep it out of every GC pass.
        gc.freeze()
        if self._watch:
            self.reloader.watch()
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
            event(log, logging.INFO, Event.SUMMARY, "tasks since the last summary: %s", text)
        if not self.stopping:
            self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._summarize)

    def _on_signal(self, signum: int) -> None:
        # Only record; the loop does the work (a signal handler must not act).
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            self.loop.call_soon(self._reopen_log, name)
        elif signum == signal.SIGHUP:
            self.loop.call_soon(lambda: self.reloader.start(name).add_done_callback(consume))
        else:
            self.loop.call_soon(self.stop, f"{name} received")

    def _reopen_log(self, why: str) -> None:
        if self.logs is not None:
            self.logs.reopen()
            log.info("log file reopened (%s)", why)

    def stop(self, why: str, exit_code: int = 0) -> None:
        if not self._stop.is_set():
            systemd.stopping()
            event(log, logging.INFO, Event.STOPPING, "stopping: %s", why)
            self.exit_code = exit_code
            self._stop.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        self.reloader.stop()
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
        await self.listeners.drain(FLUSH_GRACE)
        if self.operations is not None:
            await self.operations.aclose()
        log.info("stopped")

    # --- requests (server.RequestHandler) -------------------------------------------------

    def handle_request(self, connection: ClientConnection, request: Request) -> Answer:
        if request["op"] == "hello":
            return self._hello(connection, request)
        if connection.operator:
            if request["op"] not in OPERATOR_OPS:
                raise NotAllowed(f"an operator's connection may not send {request['op']}")
            if request["op"] == "status":
                return self.status()
            if request["op"] == "reload":
                return self.reloader.start("pbt-server reload")
            return {}
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
            case "reload":
                raise NotAllowed("reload is an operator's request (connect with operator=True)")
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
        event(
            log,
            logging.DEBUG,
            Event.SESSION_OPENED,
            "session %d opened (%s)",
            session.id,
            connection.peer,
            session=session.id,
        )
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
        task_event(
            log,
            logging.DEBUG,
            Event.ENQUEUED,
            task,
            "task s%d/t%d enqueued: codeunit %d, timeout %d ms",
            session.id,
            task.id,
            task.codeunit,
            task.timeout_ms,
        )
        served = self.scheduler.take_served()
        if served:
            # Completed after the reply goes out, as if it had run: BC's order holds.
            self.loop.call_soon(self._serve, served)
        self._dispatch()
        return {"task": task.id, "timeout": task.timeout_ms}

    def _serve(self, served: list[tuple[Task, dict[str, str]]]) -> None:
        for task, results in served:
            if self.scheduler.serve(task):
                self._completed(task, results)

    def _completed(self, task: Task, results: dict[str, str]) -> None:
        """Tell ``task``'s page its results, and count the outcome."""
        completed: Completed = {
            "op": "completed",
            "task": task.id,
            "page": task.page.id,
            "results": results,
        }
        self._send(task, completed)
        self.tally.add("completed", "")

    def connection_lost(self, connection: ClientConnection) -> None:
        if connection.operator:
            self.operators -= 1
            return
        session = self.scheduler.sessions.get(connection.session_id)
        self.connections.pop(connection.session_id, None)
        if session is not None:
            tasks = self.scheduler.close_session(session)
            self._cancel_tasks(tasks)
            event(
                log,
                logging.DEBUG,
                Event.SESSION_CLOSED,
                "session %d closed; %d task(s) cancelled",
                session.id,
                len(tasks),
                session=session.id,
            )

    # --- outcomes -------------------------------------------------------------------------

    def _send(self, task: Task, event: Completed | Failed | Cancelled) -> None:
        if self.progress:
            self.progress.forget(task)  # no progress after the outcome
        if self.telemetry is not None:
            self.telemetry.task_ended(task, event)
        connection = self.connections.get(task.session.id)
        if connection is not None:
            connection.send(event)

    def _fail(self, task: Task, code: str, text: str, stack: str = "") -> None:
        for ended in self._end(task, TaskState.FAILED):
            self.tally.add("failed", code)
            failed: Failed = {
                "op": "failed",
                "task": ended.id,
                "page": ended.page.id,
                "code": code,
                "text": text,
                "stack": stack,
            }
            self._send(ended, failed)

    def _end(self, task: Task, state: TaskState) -> list[Task]:
        """End a task that ran (or was handed to a worker); return the pages' tasks that
        end with it: itself, or a shared execution's attached tasks."""
        if task.attached is None:
            self.scheduler.finish(task, state)
            return [task]
        return self.scheduler.end_execution(task, state)

    def _cancel_tasks(self, tasks: list[Task], reason: str | None = None) -> list[int]:
        """Tell the pages, and end the tasks that were already running (no trigger runs)."""
        for task in tasks:
            code = reason or task.cancel_reason
            if self.pool.worker_of(task) is not None:
                self._end_running(task, End.CANCEL, f"cancelled ({code})")
            task_event(
                log,
                logging.DEBUG,
                Event.CANCELLED,
                task,
                "task s%d/t%d cancelled (%s)",
                task.session.id,
                task.id,
                code,
                code=code,
            )
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
            # Record changes and page closes are a page's everyday business: DEBUG.
            first = tasks[0]
            code = reason or first.cancel_reason
            everyday = code in (CancelReason.RECORD_CHANGED, CancelReason.PAGE_CLOSED)
            log.log(
                logging.DEBUG if everyday else logging.INFO,
                "session %d: %s cancelled (%s)",
                first.session.id,
                f"task {first.id}" if len(tasks) == 1 else f"{len(tasks)} tasks",
                code,
            )
        for execution in self.scheduler.take_abandoned():
            # Nobody waits for this shared execution any more: it goes like a cancelled task.
            if self.pool.worker_of(execution) is not None:
                self._end_running(execution, End.CANCEL, "cancelled (nobody waits for it)")
        if tasks and not self.stopping:
            self._dispatch()
        return [task.id for task in tasks]

    def _end_running(self, task: Task, cause: End, text: str, *, taken: bool = False) -> None:
        """A task handed to a worker ends without the worker's answer, for any cause.

        The watchdog's timer goes; the worker is killed (a crashed one is dead already) and
        its slot refilled; then the task fails, is requeued (it never started, so it may run
        elsewhere, once), or — for a cancel — was already cancelled by the scheduler.
        ``taken``: a crashed worker had taken the task off its pipe (a kill measures it).
        """
        self.watchdog.disarm(task)
        reason = f"task s{task.session.id}/t{task.id}: {text}"
        if cause is End.CANCEL:
            self.pool.release(task, reason)  # killed only if it runs on past CancelGrace
            return
        if cause is not End.CRASH:
            taken = self.pool.abort(task, reason, cause.name.lower())
        if taken and task.state is TaskState.STARTING:
            self._found_started(task)  # it may have run: failed, never requeued
        match cause:
            case End.MEMORY:
                code = ChildSessionCode.MEMORY_LIMIT
                self._fail(task, code, text)
                task_event(
                    log,
                    logging.WARNING,
                    Event.MEMORY_KILLED,
                    task,
                    "task s%d/t%d: %s",
                    task.session.id,
                    task.id,
                    text,
                    code=code,
                )
            case End.NO_ACK | End.CRASH:
                if self.scheduler.worker_lost(task):
                    task_event(
                        log,
                        logging.WARNING,
                        Event.REQUEUED,
                        task,
                        "%s; task s%d/t%d never started there, so it is requeued",
                        text,
                        task.session.id,
                        task.id,
                    )
                else:
                    self._crashed(task, text)
        self._dispatch()

    def _crashed(self, task: Task, text: str) -> None:
        code = ChildSessionCode.CRASHED
        self._fail(task, code, text)  # the page first; the log line after (see logs.py)
        task_event(
            log,
            logging.WARNING,
            Event.CRASHED,
            task,
            "task s%d/t%d: %s",
            task.session.id,
            task.id,
            text,
            code=code,
        )

    def _dispatch(self) -> None:
        pool = self.pool
        while pool.has_idle:
            task = self.scheduler.next_task()
            if task is None:
                return
            if task.cacheable:
                task.version = self.cache.version_now()  # before the worker's snapshot
            worker = pool.assign(task)
            self.watchdog.expect_ack(task)
            if log.isEnabledFor(logging.DEBUG):
                pid = worker.pid if worker is not None else 0
                task_event(
                    log,
                    logging.DEBUG,
                    Event.STARTED,
                    task,
                    "task s%d/t%d handed to worker %d",
                    task.session.id,
                    task.id,
                    pid,
                    worker=pid,
                )

    # --- pool events (pool.PoolListener) --------------------------------------------------

    def capacity_freed(self) -> None:
        if not self.stopping:
            self._dispatch()

    def _found_started(self, task: Task, at: float | None = None) -> None:
        """The task's worker had taken it off its pipe (``at``: only just, its clock starts
        now): it runs, and its worker's death fails it instead of requeueing it."""
        self.scheduler.started(task, at)
        if log.isEnabledFor(logging.DEBUG):
            worker = self.pool.worker_of(task)  # None once it ended (died, or was killed)
            task_event(
                log,
                logging.DEBUG,
                Event.TAKEN,
                task,
                "task s%d/t%d was taken by %s%s",
                task.session.id,
                task.id,
                f"worker {worker.pid}" if worker is not None else "its worker, which has ended",
                " late: its clock starts now" if at is not None else "",
                worker=worker.pid if worker is not None else None,
            )

    def task_progress(self, task: Task, progress: dict[str, str]) -> None:
        for target in task.attached if task.attached is not None else (task,):
            self.progress.update(target, progress)

    def _send_progress(self, task: Task, progress: dict[str, str]) -> bool:
        connection = self.connections.get(task.session.id)
        if connection is None:
            return True  # nobody to tell
        if connection.backlog() > BACKLOG:
            return False
        event: Progress = {
            "op": "progress",
            "task": task.id,
            "page": task.page.id,
            "progress": progress,
        }
        connection.send(event)
        return True

    def task_done(self, task: Task, results: dict[str, str]) -> None:
        self.watchdog.disarm(task)
        if task.cacheable and task.version is not None:
            assert task.key is not None
            assert task.started_at is not None
            self.cache.put(task.key, task.version, results, task.started_at)
        for ended in self._end(task, TaskState.COMPLETED):
            self._completed(ended, results)
        # DEBUG, not INFO: a line per completed task halves throughput (the listener thread
        # competes for the GIL); INFO gets the periodic summary instead.
        if log.isEnabledFor(logging.DEBUG):
            assert task.started_at is not None
            wait_ms = round((task.started_at - task.enqueued_at) * 1000, 1)
            run_ms = round((self.loop.time() - task.started_at) * 1000, 1)
            task_event(
                log,
                logging.DEBUG,
                Event.COMPLETED,
                task,
                "task s%d/t%d completed: codeunit %d, waited %.1f ms, ran %.1f ms",
                task.session.id,
                task.id,
                task.codeunit,
                wait_ms,
                run_ms,
                wait_ms=wait_ms,
                run_ms=run_ms,
            )
        self._dispatch()

    def task_failed(self, task: Task, code: str, text: str, stack: str) -> None:
        self.watchdog.disarm(task)
        task_event(
            log,
            logging.INFO,
            Event.FAILED,
            task,
            "task s%d/t%d failed: %s: %.200s",
            task.session.id,
            task.id,
            code,
            text,
            code=code,
        )
        self._fail(task, code, text, stack)
        self._dispatch()

    def task_lost(self, task: Task, how: str, *, taken: bool) -> None:
        self._end_running(task, End.CRASH, how, taken=taken)

    def pool_broken(self, reason: str) -> None:
        log.critical("worker pool broken: %s", reason)
        self.stop(reason, exit_code=1)

    # --- watchdog -------------------------------------------------------------------------

    def _timed_out(self, task: Task) -> None:
        # The stuck code's stack first (a few ms at most), then the kill and the error.
        reason = f"task s{task.session.id}/t{task.id}: timed out"
        self.pool.abort_with_stack(task, reason, lambda stack: self._task_timeout(task, stack))

    def _task_timeout(self, task: Task, stack: str) -> None:
        if task.state is not TaskState.RUNNING:
            return  # cancelled while its stack was being taken: that was its outcome
        self.watchdog.disarm(task)
        self._fail(task, ChildSessionCode.TASK_TIMEOUT, TASK_TIMEOUT_TEXT, stack)
        task_event(
            log,
            logging.WARNING,
            Event.TIMED_OUT,
            task,
            "task s%d/t%d timed out after %d ms; its worker was killed; its stack:\n%s",
            task.session.id,
            task.id,
            task.timeout_ms,
            stack,
            code=ChildSessionCode.TASK_TIMEOUT,
        )
        self._dispatch()

    def _not_acknowledged(self, task: Task) -> None:
        ack = self.config.workers.ack_timeout_ms / 1000
        self._end_running(
            task, End.NO_ACK, f"its worker did not take the task off its pipe within {ack:g} s"
        )

    def _over_memory(self, task: Task, rss: int) -> None:
        limit = self.config.workers.max_memory_mb
        text = (
            f"the child session used {rss / 2**20:.0f} MB, over the limit of {limit} MB "
            "(MaxMemoryMB); its worker was killed"
        )
        self._end_running(task, End.MEMORY, text)

    # --- reload ---------------------------------------------------------------------------

    def apply(self, config: ServerConfig, image: WorkerImage) -> None:
        """Take a reload's settings and code (tried, and imported already): limits and
        timeouts for new enqueues, the new registry, renewed workers (the log's level and
        format: :meth:`retune_log`, once the reload is logged)."""
        self.config = config
        server = config.server
        self.scheduler.limits = config.asynchronous_processing
        self.scheduler.codeunits = image.codeunits
        self.scheduler.sharing = _sharing(image)
        self.progress.interval = config.asynchronous_processing.progress_interval_ms / 1000
        # The new code may compute otherwise: nothing the old one returned is served, now or
        # when a run it started ends.
        self.cache.clear()
        self.scheduler.renew_executions()
        self.cache.limit = config.workers.result_cache_mb << 20
        self.cache.version = _data_version(config)
        self.watchdog.ack_timeout = config.workers.ack_timeout_ms / 1000
        self.watchdog.limit_bytes = config.workers.max_memory_mb << 20
        self.budget.limit = server.max_buffered_mb << 20
        self.max_sessions = fit_fd_limit(server.max_connections, _fd_reserve(config.workers.count))
        self.pool.renew(config.workers, config.database, image)
        self._dispatch()  # a higher concurrency limit, or more workers, may let tasks go

    def retune_log(self) -> None:
        if self.logs is not None:
            self.logs.retune(self.config.server.log_level, self.config.server.log_format)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> Message:
        return status_report(
            sessions=self.scheduler.sessions.values(),
            pool=self.pool,
            now=self.loop.time(),
            uptime=time.monotonic() - self.started,
            socket_path=str(self.config.server.socket_path),
            tcp=self.listeners.tcp_text() or None,
            metrics=self.operations.address_text if self.operations is not None else None,
            max_sessions=self.max_sessions,
            sharing={
                "shared": {
                    "executions": self.scheduler.shared.waiting + self.scheduler.shared.running,
                    "attaches": self.scheduler.attaches,
                },
                "cache": {
                    "hits": self.cache.hits,
                    "misses": self.cache.misses,
                    "entries": len(self.cache),
                    "bytes": self.cache.used,
                },
            },
        )


def _data_version(config: ServerConfig) -> Callable[[], Version | None] | None:
    path = config.database.url.path
    return sqlite_version(path) if path is not None else None


def _sharing(image: WorkerImage) -> dict[int, Sharing]:
    return {i: c.sharing for i, c in image.codeunits.items() if c.sharing is not None}


def _fd_reserve(workers: int) -> int:
    """The fds the broker needs besides its sessions' sockets: its own, the operators', the
    connections that have not said hello yet, the metrics endpoint's, and about 8 per
    worker (pipes, pidfd, log queue), the standby and a reload's trial included."""
    pending = 2 * PENDING_PER_LISTENER  # Unix socket and TCP
    return FD_RESERVE + OPERATOR_RESERVE + pending + METRICS_REQUESTS + 8 * (workers + 2)


def run_broker(
    config: ServerConfig,
    *,
    log_to_stderr: bool,
    private_fds: tuple[int, ...] = (),
    watch: bool = False,
) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT; return its exit code.

    ``private_fds`` are the caller's fds no worker may inherit (the pid file's lock);
    ``watch``: reload whenever a codeunit module's file or server.ini changes.
    """
    server = config.server
    systemd.take_socket()  # before any fork: only the broker speaks to systemd
    # Until the loop handles them, a SIGHUP (reload) or SIGUSR1 (reopen the log) must not
    # end a broker that is still importing its codeunits or booting its workers.
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    logs = BrokerLogging(
        server.log_file, server.log_level, to_stderr=log_to_stderr, log_format=server.log_format
    )
    try:
        # Before the loop exists and before any fork: workers inherit what this imports.
        image = prepare_workers(config.codeunits, config.database)
        factory = loop_factory(config.server.event_loop)
        log.info("event loop: %s", "asyncio" if factory is None else "uvloop")
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_main(config, logs, image, private_fds, watch))
    except (PbtError, ImportError, OSError) as err:
        log.critical("pbt-server failed: %s", err)
        return 1
    except Exception as err:
        log.critical("pbt-server failed: %s", err, exc_info=True)
        return 1
    finally:
        logs.close()


async def _main(
    config: ServerConfig,
    logs: BrokerLogging,
    image: WorkerImage,
    private_fds: tuple[int, ...],
    watch: bool,
) -> int:
    broker = Broker(config, asyncio.get_running_loop(), image, logs, private_fds, watch=watch)
    return await broker.serve()
