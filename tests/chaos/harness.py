"""The chaos harness: a broker, ledger clients and victims, and the faults it injects.

::

    harness (this process) ─────────────── starts ──▶ broker (python -m pbt_server run)
      │ monitor session: status polls, SIGKILL / SIGSTOP (+ SIGCONT later) of workers,     ▲
      │ RSS samples of the broker; writes to the database (chaos_meta) through a           │
      │ connection of its own; reloads (pbt-server reload, SIGHUP, an operator request)    │
      │ with new settings and a new code generation                                        │
      ├─ ledger clients (python -m tests.chaos.client, aio or blocking): sessions that     │
      │  enqueue the Chaos codeunit and the shared ones (tests/chaos_codeunits.py), follow ├─
      │  progress, cancel by id (also racing completion), change records, close pages,
      │  close or break their connection; each keeps a ledger of every task
      │  (tests/chaos/ledger.py) and checks it when the session ends
      └─ victim clients: the same load, SIGKILLed at random moments, then replaced

The shared codeunits' records of every client are checked together against the harness's
writes and reloads (``ledger.cross_violations``): one execution's tasks agree, cached results
serve only while the data is unchanged, a task enqueued after a reload runs the new code.

After the chaos the broker must settle (no session, task or shared execution left), its
``/metrics`` must add up to the ledgers per codeunit (``ledger.scrape_violations``), it must
still complete a fresh task, not have grown its RSS, stop cleanly under a burst of load
(every pending handle ends ``ServerShuttingDown``), leave no worker, grandchild or zombie
behind, and have logged no traceback.

Frozen workers are resumed after ``STOP_HOLD``; one that by then still holds a task (never
taken off its pipe, so its timeout clock never started, and no ack deadline gave up on it)
is reported apart, as a "finding".
"""

from __future__ import annotations

import collections
import configparser
import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import psutil

from pbt_server import client as blocking
from pbt_server.config import load_config
from pbt_server.errors import PbtError
from tests import scrape
from tests.broker_process import REPO, BrokerProcess, alive, make_database, write_ini
from tests.chaos.episodes import NORMAL_TIMEOUT_MS
from tests.chaos.ledger import (
    Reload,
    Write,
    classify,
    cross_violations,
    of_codeunit,
    scrape_violations,
)
from tests.chaos_codeunits import CHAOS, GENERATION_VARIABLE, SHARED_CODEUNITS, starttime

MARKER: Final = "PBT_CHAOS_RUN"  # in the broker's environment, inherited by all it starts
PR_SET_CHILD_SUBREAPER: Final = 36
# A frozen worker holding a task is dead by then: its task timed out, or (never taken off its
# pipe) the broker's ack deadline gave up on it.
# A frozen worker is given up on after AckTimeout: hold STOPs past both it and the timeout.
ACK_TIMEOUT: Final = load_config(None, environ={}).workers.ack_timeout_ms / 1000
STOP_HOLD: Final = max(NORMAL_TIMEOUT_MS / 1000, ACK_TIMEOUT) + 2.5
LEDGER_CODEUNITS: Final = (CHAOS, *SHARED_CODEUNITS)  # what ledger clients enqueue
# What a reload may change: the pool's size and two timings (CancelGrace stays above 0, so a
# cancelled running task always goes through the grace).
RELOAD_GRACES: Final = ("00:00:00.050", "00:00:00.020", "00:00:00.150")
RELOAD_INTERVALS: Final = ("00:00:00.020", "00:00:00.050", "00:00:00.100")
# How a reload is asked for: `pbt-server reload`, SIGHUP, or the operator request the command
# sends, made from here (then the harness knows to the millisecond when it completed, so a
# shared execution of the old code is often still running then).
RELOAD_WAYS: Final = {"command": 0.4, "sighup": 0.3, "request": 0.3}


@dataclasses.dataclass
class ChaosConfig:
    seed: int = 1
    tasks: int = 100_000  # accepted tasks over all ledger clients
    sessions: int = 24  # concurrent ledger sessions over all ledger clients
    clients: int = 3  # ledger client processes
    sync_clients: int = 1  # of which use the blocking client (threads) instead of aio
    victims: int = 1  # client processes that are SIGKILLed and replaced
    workers: int = 4
    queue_length: int = 30  # ChildSessionsMaxQueueLength: small, so QueueFull happens
    max_tasks_per_worker: int = 97  # MaxTasksPerWorker: workers retire mid-chaos too (0: never)
    kill_interval: float = 0.7  # mean seconds between worker SIGKILLs (0: none)
    stop_interval: float = 4.0  # mean seconds between worker SIGSTOPs (0: none)
    victim_lifetime: float = 3.0  # mean seconds a victim client lives
    stall_timeout: float = 60.0  # a session with no outcome for this long reports lost tasks
    deadline: float = 0.0  # seconds for the whole run (0: from the task count)
    cancel_grace: str = "00:00:00.050"  # CancelGrace: a cancelled running task's grace
    progress_interval: str = "00:00:00.020"  # ProgressInterval (short: more progress)
    write_interval: float = 0.3  # mean seconds between the harness's database writes (0: none)
    reload_interval: float = 6.0  # mean seconds between reloads (0: none)
    journal: str = ""  # the database's journal mode: wal, delete, or "" (by the seed)
    log_level: str = "WARNING"
    verbose: bool = False
    # Self-test of the ledger: tamper with every 40th outcome event a client receives
    # ("drop", "duplicate", "misroute", "late_progress"); the run must then report violations.
    inject: str = ""

    @classmethod
    def quick(cls, seed: int = 1) -> ChaosConfig:
        return cls(
            seed=seed,
            tasks=6000,
            sessions=10,
            clients=2,
            kill_interval=0.4,
            stop_interval=3.0,
            victim_lifetime=1.5,
            stall_timeout=30.0,
        )


@dataclasses.dataclass
class ChaosReport:
    seed: int
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    findings: list[str] = dataclasses.field(default_factory=list)
    rss_mb: list[float] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    kept: Path | None = None  # the run directory, kept when something went wrong

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        c = self.counts

        def group(prefix: str) -> str:
            items = sorted((k[len(prefix) :], v) for k, v in c.items() if k.startswith(prefix))
            return ", ".join(f"{k} {v}" for k, v in items) or "none"

        accepted = c["accepted"]
        rate = accepted / self.elapsed if self.elapsed else 0.0
        lines = [
            f"chaos seed {self.seed}: {accepted} tasks accepted in {self.elapsed:.1f} s "
            f"({rate:.0f}/s), {c['sessions']} ledger sessions, {c['refused']} enqueues refused",
            f"  completed {c['outcome:completed']}; errors: {group('error:')}",
            f"  cancelled: {group('cancelled:')}; connection lost (deliberate): "
            f"{c['outcome:lost']}",
            f"  refused: {group('refused:')}",
            f"  modes: {group('mode:')}",
            f"  worker SIGKILLs {c['kills']}, SIGSTOPs {c['stops']} (resumed alive "
            f"{c['stops_resumed']}), victim clients killed {c['victims_killed']}",
            f"  sessions ended: {group('ended:')}; cancel() calls {c['cancel_calls']} "
            f"(True {c['cancel_true']}), set_record {c['set_record']}, page closes "
            f"{c['page_close']}",
            f"  triggers: completed {c['trigger:completed']}, error {c['trigger:error']}; "
            f"notifications: {group('notification:')}",
            f"  stopped under load: {group('burst:')}",
            f"  shared tasks: {group('shared:')}; cache: served {c['cache:served']} (broker "
            f"hits {c['cache:hits']}, misses {c['cache:misses']}); data writes {c['writes']} "
            f"({'WAL' if c['journal:wal'] else 'rollback journal'})",
            f"  progress: {group('progress:')}",
            f"  reloads: {c['reloads']} (by pbt-server reload {c['reloads:command']}, SIGHUP "
            f"{c['reloads:sighup']}, operator request {c['reloads:request']}), code generation "
            f"{c['generation']} at the end",
            f"  the broker's metrics: {c['scrape:tasks']} tasks ended (the ledgers: "
            f"{c['accepted']} accepted; events seen {group('broker:')})",
            f"  unexpected crashes {c['unexpected_crash']} + timeouts "
            f"{c['unexpected_timeout']} (<= kills + stops); spawned processes {c['spawned']}",
        ]
        if self.rss_mb:
            lines.append(
                f"  broker RSS: {self.rss_mb[0]:.1f} MB at start, max {max(self.rss_mb):.1f} "
                f"MB, {self.rss_mb[-1]:.1f} MB at end ({len(self.rss_mb)} samples)"
            )
        lines.append(f"  findings: {len(self.findings)}; violations: {len(self.violations)}")
        lines += [f"  FINDING {f}" for f in self.findings[:20]]
        lines += [f"  VIOLATION {v}" for v in self.violations[:50]]
        if len(self.violations) > 50:
            lines.append(f"  ... and {len(self.violations) - 50} more violations")
        if self.kept:
            lines.append(f"  run directory kept: {self.kept}")
        return "\n".join(lines)


@contextlib.contextmanager
def adopting_orphans() -> Iterator[list[tuple[int, str, str]]]:
    """Be a child subreaper meanwhile: what the broker leaves behind when it exits (live or
    zombie) reparents to us. Yields a list, filled on exit with (pid, name, status) of each
    such process, which is then killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    adopted: list[tuple[int, str, str]] = []
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield adopted
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for child in me.children():
            if child.pid in before:
                continue
            with contextlib.suppress(psutil.Error):
                adopted.append((child.pid, child.name(), str(child.status())))
                child.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(proc)
        except OSError:
            continue
    return found


@dataclasses.dataclass(eq=False)
class ClientProcess:
    index: int
    victim: bool
    process: subprocess.Popen[bytes]
    result: Path
    started: float
    lifetime: float = 0.0


class Harness:
    def __init__(self, config: ChaosConfig, report: ChaosReport) -> None:
        self.config = config
        self.report = report
        self.rng = random.Random(f"harness/{config.seed}")
        self.counts = report.counts
        self.run_dir = Path(tempfile.mkdtemp(prefix="pbtchaos-", dir="/tmp"))
        self.pids_dir = self.run_dir / "pids"
        self.pids_dir.mkdir()
        self.marker = uuid.uuid4().hex
        self.broker: BrokerProcess | None = None
        self.monitor: blocking.Session | None = None
        self.ledger: list[ClientProcess] = []
        self.victims: list[ClientProcess] = []
        self.stopped: dict[int, tuple[float, str, object]] = {}  # pid -> (when, state, task)
        self.next_client = 0
        self.status: dict[str, Any] = {}
        self.database = self.run_dir / "chaos.db"
        self.generation_file = self.run_dir / "generation"
        self.db: sqlite3.Connection | None = None  # the harness's own, writing connection
        self.writes: list[Write] = []
        self.reloads: list[Reload] = []
        self.reloading: tuple[subprocess.Popen[bytes], int] | None = None
        self.generation = 0
        self.shared: list[dict[str, Any]] = []  # the ledger clients' shared task records
        self.latest_gen: dict[str, tuple[float, str]] = {}

    def log(self, text: str) -> None:
        if self.config.verbose:
            print(f"[chaos {time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # --- setup -----------------------------------------------------------------------------

    def start_broker(self) -> None:
        config = self.config
        journal = config.journal or ("wal" if config.seed % 2 == 0 else "delete")
        make_database(self.database)
        with contextlib.closing(sqlite3.connect(self.database, isolation_level=None)) as db:
            db.execute(f"PRAGMA journal_mode = {journal}")
            db.execute("CREATE TABLE chaos_meta (version INTEGER NOT NULL)")
            db.execute("INSERT INTO chaos_meta VALUES (0)")
        self.counts[f"journal:{journal}"] = 1
        self.generation_file.write_text("0")
        broker = BrokerProcess.start(
            {
                "Workers": {
                    "Count": str(config.workers),
                    "MaxTasksPerWorker": str(config.max_tasks_per_worker),
                    "CancelGrace": config.cancel_grace,
                },
                "Codeunits": {"Modules": "tests.codeunits tests.chaos_codeunits"},
                "Server": {"LogLevel": config.log_level, "MetricsAddress": "127.0.0.1:0"},
                "AsynchronousProcessing": {
                    "ChildSessionsMaxQueueLength": str(config.queue_length),
                    "ProgressInterval": config.progress_interval,
                },
                "Database": {"Url": f"sqlite:///{self.database}"},
            },
            env={MARKER: self.marker, GENERATION_VARIABLE: str(self.generation_file)},
        )
        self.broker = broker
        self.monitor = broker.connect()
        self.db = sqlite3.connect(self.database, timeout=30, isolation_level=None)

    def spawn_client(self, *, victim: bool, tasks: int, sessions: int, flavour: str) -> None:
        assert self.broker is not None
        index = self.next_client
        self.next_client += 1
        result = self.run_dir / f"client-{index}.json"
        spec = {
            "index": index,
            "seed": self.config.seed,
            "socket": str(self.broker.socket),
            "pids": str(self.pids_dir),
            "victim": victim,
            "tasks": tasks,
            "sessions": sessions,
            "flavour": flavour,
            "stall_timeout": self.config.stall_timeout,
            "inject": "" if victim else self.config.inject,
            "result": str(result),
        }
        with open(self.run_dir / f"client-{index}.out", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.client", json.dumps(spec)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = ClientProcess(index, victim, process, result, time.monotonic())
        if victim:
            proc.lifetime = self.rng.expovariate(1 / self.config.victim_lifetime)
            self.victims.append(proc)
        else:
            self.ledger.append(proc)

    # --- chaos -----------------------------------------------------------------------------

    def is_worker(self, pid: int) -> bool:
        assert self.broker is not None
        try:
            proc = psutil.Process(pid)
            return proc.ppid() == self.broker.pid and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def poll_status(self) -> None:
        assert self.monitor is not None
        assert self.broker is not None
        self.status = dict(self.monitor.status())
        pids = {w["pid"] for w in self.status["workers"] if w["pid"]}
        self.broker.seen_workers |= pids

    def pick_worker(self, prefer_busy: float) -> dict[str, Any] | None:
        workers = [w for w in self.status.get("workers", []) if w["pid"]]
        busy = [w for w in workers if w["task"]]
        pool = busy if busy and self.rng.random() < prefer_busy else workers
        return self.rng.choice(pool) if pool else None

    def kill_worker(self) -> None:
        worker = self.pick_worker(0.7)
        if worker is not None and self.is_worker(worker["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker["pid"], signal.SIGKILL)
                self.counts["kills"] += 1
                self.stopped.pop(worker["pid"], None)

    def stop_worker(self) -> None:
        worker = self.pick_worker(0.6)
        pid = worker["pid"] if worker else 0
        if worker and pid not in self.stopped and self.is_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self.counts["stops"] += 1
                self.stopped[pid] = (time.monotonic(), worker["state"], worker["task"])

    def resume_workers(self, *, all_now: bool = False) -> None:
        now = time.monotonic()
        for pid, (when, state, task) in list(self.stopped.items()):
            if not all_now and now - when < STOP_HOLD:
                continue
            del self.stopped[pid]
            if not self.is_worker(pid):
                continue  # the watchdog (or a kill) took it, as it should
            entry = next((w for w in self.status.get("workers", []) if w["pid"] == pid), None)
            if entry is not None and entry["task"] and not all_now:
                self.report.findings.append(
                    f"worker {pid} was SIGSTOPped while {state} (task {task}); "
                    f"{now - when:.1f} s later it is alive, {entry['state']}, and holds task "
                    f"{entry['task']}, which never timed out (a task handed to a frozen worker "
                    "stays in its pipe, so its timeout clock never starts)"
                )
                self.counts["stalled_starts"] += 1
            self.counts["stops_resumed"] += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def churn_victims(self, keep: bool) -> None:
        now = time.monotonic()
        for victim in list(self.victims):
            if victim.process.poll() is None and now - victim.started < victim.lifetime and keep:
                continue
            if victim.process.poll() is None:
                victim.process.kill()
                self.counts["victims_killed"] += 1
            victim.process.wait()
            self.victims.remove(victim)
        while keep and len(self.victims) < self.config.victims:
            self.spawn_client(victim=True, tasks=0, sessions=4, flavour="aio")

    def write(self) -> None:
        """Commit a new data version through the harness's own connection, timed."""
        assert self.db is not None
        version = self.writes[-1].version + 1 if self.writes else 1
        start = time.monotonic()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE chaos_meta SET version = ?", (version,))
            self.db.execute("COMMIT")
        except sqlite3.Error as err:
            # The workers' reads must never keep the application from writing for long.
            self.report.violations.append(f"the harness's write of version {version}: {err}")
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            return
        self.writes.append(Write(start, time.monotonic(), version))
        self.counts["writes"] += 1

    def reload(self) -> None:
        """A new code generation and new settings, by ``pbt-server reload`` or SIGHUP."""
        assert self.broker is not None
        if self.reloading is not None:
            return  # one at a time: the last one's time is what the checks need
        self.generation += 1
        tmp = self.generation_file.with_suffix(".tmp")
        tmp.write_text(str(self.generation))
        tmp.rename(self.generation_file)
        self.rewrite_settings()
        self.counts["reloads"] += 1
        way = self.rng.choices(list(RELOAD_WAYS), weights=list(RELOAD_WAYS.values()))[0]
        self.counts[f"reloads:{way}"] += 1
        if way == "sighup":
            os.kill(self.broker.pid, signal.SIGHUP)
            # Known complete only once a later reload has returned (they run one at a time,
            # in order).
            self.reloads.append(Reload(self.generation, None))
            return
        if way == "request":
            try:
                with blocking.connect(str(self.broker.socket), operator=True) as operator:
                    operator._request("reload", {}, timeout=90)
            except (PbtError, TimeoutError) as err:
                self.report.violations.append(f"reload (to generation {self.generation}): {err!r}")
                return
            self.reloaded(self.generation, time.monotonic())
            return
        process = subprocess.Popen(
            [sys.executable, "-m", "pbt_server", "reload", "--config", str(self.broker.config)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.reloading = (process, self.generation)

    def reload_done(self, *, wait: bool = False) -> None:
        """Take the answer of a `pbt-server reload` under way, if it has come."""
        if self.reloading is None:
            return
        process, generation = self.reloading
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=120)
        if process.poll() is None:
            if not wait:
                return
            process.kill()
        output = process.communicate()[0].decode(errors="replace")
        done = time.monotonic()
        self.reloading = None
        if process.returncode != 0:
            self.report.violations.append(
                f"pbt-server reload (to generation {generation}) exited {process.returncode}: "
                f"{output[-2000:]}"
            )
            return
        self.reloaded(generation, done)

    def reloaded(self, generation: int, done: float) -> None:
        """The reload to ``generation`` (and every SIGHUP one before it) was done by ``done``."""
        self.reloads = [Reload(r.gen, done if r.done is None else r.done) for r in self.reloads]
        self.reloads.append(Reload(generation, done))

    def rewrite_settings(self) -> None:
        """server.ini with another pool size, CancelGrace and ProgressInterval."""
        assert self.broker is not None
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(self.broker.config)
        workers = self.config.workers
        count = self.rng.choice((max(2, workers - 1), workers, workers + 1))
        parser["Workers"]["Count"] = str(count)
        parser["Workers"]["CancelGrace"] = self.rng.choice(RELOAD_GRACES)
        parser["AsynchronousProcessing"]["ProgressInterval"] = self.rng.choice(RELOAD_INTERVALS)
        write_ini(self.broker.config, {name: dict(parser[name]) for name in parser.sections()})

    def sample_rss(self) -> None:
        assert self.broker is not None
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(self.broker.pid).memory_info().rss
            self.report.rss_mb.append(rss / 2**20)

    def progress(self) -> int:
        total = 0
        for proc in self.ledger:
            with contextlib.suppress(OSError, ValueError):
                total += int(proc.result.with_suffix(".progress").read_text() or 0)
        return total

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        self.t0 = time.monotonic()
        self.start_broker()
        per_client = config.tasks // config.clients
        lanes = max(1, config.sessions // config.clients)
        for n in range(config.clients):
            tasks = per_client + (config.tasks - per_client * config.clients if n == 0 else 0)
            flavour = "sync" if n < config.sync_clients else "aio"
            self.spawn_client(victim=False, tasks=tasks, sessions=lanes, flavour=flavour)
        deadline = self.t0 + (config.deadline or 300 + config.tasks / 20)
        # The first kill and stop come early, so even a short run has some of each.
        next_kill = self.next_event(config.kill_interval, first_within=1.0)
        next_stop = self.next_event(config.stop_interval, first_within=2.0)
        next_write = self.next_event(config.write_interval)
        next_reload = self.next_event(config.reload_interval, first_within=3.0)
        next_rss = next_log = time.monotonic()
        while any(proc.process.poll() is None for proc in self.ledger):
            now = time.monotonic()
            if now > deadline:
                self.report.violations.append(
                    f"the run did not finish within {deadline - self.t0:.0f} s "
                    f"({self.progress()} tasks accepted); status {self.status}"
                )
                break
            self.poll_status()
            if now >= next_kill:
                self.kill_worker()
                next_kill = self.next_event(config.kill_interval)
            if now >= next_stop:
                self.stop_worker()
                next_stop = self.next_event(config.stop_interval)
            if now >= next_write:
                self.write()
                next_write = self.next_event(config.write_interval)
            self.reload_done()
            if now >= next_reload:
                self.reload()
                next_reload = self.next_event(config.reload_interval)
            self.resume_workers()
            self.churn_victims(keep=True)
            if now >= next_rss:
                self.sample_rss()
                next_rss = now + 0.5
            if now >= next_log:
                self.log(
                    f"{self.progress()} accepted; kills {self.counts['kills']}, stops "
                    f"{self.counts['stops']}, victims killed {self.counts['victims_killed']}"
                )
                next_log = now + 10
            time.sleep(self.rng.uniform(0.02, 0.1))  # the monitor's polling interval
        self.resume_workers(all_now=True)
        self.churn_victims(keep=False)
        self.reload_done(wait=True)
        for proc in self.ledger:
            if proc.process.poll() is None:
                proc.process.kill()
            proc.process.wait()
        self.collect()
        self.settle()
        self.sample_rss()
        self.check_rss()
        self.stop_broker()

    def next_event(self, mean: float, first_within: float = float("inf")) -> float:
        if mean <= 0:
            return float("inf")
        return time.monotonic() + min(self.rng.expovariate(1 / mean), first_within)

    def collect(self) -> None:
        for proc in self.ledger:
            try:
                data = json.loads(proc.result.read_text())
            except (OSError, ValueError):
                out = (self.run_dir / f"client-{proc.index}.out").read_text()[-3000:]
                self.report.violations.append(
                    f"client {proc.index} left no result (exit {proc.process.returncode}): {out}"
                )
                continue
            self.counts.update(data["counts"])
            self.report.violations += data["violations"]
            if data["crashed"]:
                self.report.violations.append(f"client {proc.index} crashed: {data['crashed']}")
            self.shared += data["shared"]
            for gen, (enqueued, where) in data["latest_gen"].items():
                if enqueued > self.latest_gen.get(gen, (-1.0, ""))[0]:
                    self.latest_gen[gen] = (enqueued, where)
        problems, counts = cross_violations(self.shared, self.writes, self.reloads, self.latest_gen)
        self.report.violations += problems
        self.counts.update(counts)
        self.counts["generation"] = self.generation
        # A kill crashes at most one execution; a stop times out (or, never taken, crashes)
        # one (the shared ones count once per execution, however many tasks attached).
        c = self.counts
        if c["unexpected_crash"] + c["unexpected_timeout"] > c["kills"] + c["stops"]:
            self.report.violations.append(
                f"{c['unexpected_crash']} well-behaved tasks crashed and "
                f"{c['unexpected_timeout']} timed out, but the harness killed only "
                f"{c['kills']} workers and froze {c['stops']}"
            )

    def settle(self) -> None:
        """No chaos left: the broker must settle, reap everything, and still serve."""
        assert self.monitor is not None
        assert self.broker is not None
        broker = self.broker
        monitor = self.monitor
        deadline = time.monotonic() + 60
        while True:
            self.poll_status()
            sessions = [s for s in self.status["sessions"] if s["id"] != monitor.id]
            workers = self.status["workers"]
            busy = [w for w in workers if w["state"] != "idle"]
            if not sessions and not busy and not self.status["totals"]["shared"]["executions"]:
                break
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"the broker did not settle within 60 s: sessions {sessions}, workers {busy}"
                )
                break
            time.sleep(0.05)
        self.counts["cache:hits"] = self.status["totals"]["cache"]["hits"]
        self.counts["cache:misses"] = self.status["totals"]["cache"]["misses"]
        if self.counts["cache:served"] > self.counts["cache:hits"]:
            self.report.violations.append(
                f"{self.counts['cache:served']} tasks got the results of a run that had ended "
                f"before they were enqueued, but the broker counts {self.counts['cache:hits']} "
                "cache hits"
            )
        self.check_scrape()
        deadline = time.monotonic() + 30
        while True:
            # The pool's workers as of now: a worker that retired meanwhile (its task count,
            # a leftover) has a replacement the first status did not list.
            self.poll_status()
            pids = {w["pid"] for w in self.status["workers"]}
            try:
                children = psutil.Process(broker.pid).children()
                extra = [_describe(p) for p in children if p.pid not in pids]
            except psutil.Error as err:
                extra = [(0, str(err), "", "")]
            if not extra:
                break
            if time.monotonic() > deadline:
                self.report.violations.append(
                    f"the broker still has non-worker children (or zombies) 30 s after the "
                    f"chaos: {extra[:20]}"
                )
                break
            time.sleep(0.05)
        # Still serving: a fresh session completes a task and reports its identity back.
        with broker.connect() as fresh:
            page = fresh.open_page("After the chaos", record_id="Final")
            params = {"mode": "fast", "token": "final"}
            try:
                results = page.enqueue_background_task(CHAOS, params).result(timeout=30)
            except (PbtError, TimeoutError) as err:
                self.report.violations.append(f"a fresh session's task failed: {err!r}")
            else:
                expected = dict(params, ctx_task="1", ctx_session=str(fresh.id), ctx_record="Final")
                expected["gen"] = str(self.generation)
                if results != expected:
                    self.report.violations.append(f"the final task returned {results}")
        self.counts["spawned"] = len(list(self.pids_dir.glob("*.[0-9]")))

    def check_scrape(self) -> None:
        """Settled: the broker's metrics for the ledger clients' tasks equal the ledgers'."""
        address = self.status["server"]["metrics"]
        try:
            tasks = scrape.tasks_total(scrape.scrape(address))
        except (OSError, AssertionError) as err:
            self.report.violations.append(f"scraping http://{address}/metrics failed: {err!r}")
            return
        for codeunit in LEDGER_CODEUNITS:
            mine = scrape.of_codeunit(tasks, codeunit)
            self.counts["scrape:tasks"] += sum(mine.values())
            for problem in scrape_violations(of_codeunit(self.counts, codeunit), mine):
                self.report.violations.append(f"codeunit {codeunit}: {problem}")

    def check_rss(self) -> None:
        samples = self.report.rss_mb
        if len(samples) < 8:
            return
        first = samples[len(samples) // 8 : len(samples) // 2]
        second = samples[len(samples) // 2 :]
        before, after = statistics.median(first), statistics.median(second)
        if after > before * 1.5 + 20:
            self.report.violations.append(
                f"broker RSS grew: median {before:.1f} MB in the first half, {after:.1f} MB "
                f"in the second (max {max(samples):.1f} MB)"
            )

    def stop_broker(self) -> None:
        """Stop the broker under load: every handle still pending ends ServerShuttingDown."""
        assert self.broker is not None
        assert self.monitor is not None
        broker = self.broker
        self.monitor.close()
        self.monitor = None
        burst = broker.connect()
        handles: list[tuple[str, Any]] = []
        try:
            pages = [burst.open_page(f"Burst {n}", record_id=f"B{n}") for n in range(3)]
            modes = ["spawn_spin", "escape", "sleep", "spin", "fast", "spawn"]
            for n in range(24):
                mode = modes[n % len(modes)]
                params = {
                    "mode": mode,
                    "token": f"burst{n}",
                    "ms": "3000",
                    "pids": str(self.pids_dir),
                }
                task = pages[n % 3].enqueue_background_task(CHAOS, params, timeout=60_000)
                handles.append((mode, task))
            # Stop once the first tasks have their grandchildren (and an escapee) running.
            deadline = time.monotonic() + 10
            spawned = [self.pids_dir / "burst0.0", self.pids_dir / "burst1.1"]
            while not all(p.exists() for p in spawned) and time.monotonic() < deadline:
                time.sleep(0.02)
            with adopting_orphans() as adopted:
                try:
                    code = broker.stop()
                except AssertionError as err:
                    self.report.violations.append(f"stopping the broker: {err}")
                else:
                    if code != 0:
                        self.report.violations.append(f"the broker exited with {code}")
            if adopted:
                self.report.violations.append(
                    "the broker exited leaving children it had not reaped (they reparent to "
                    f"init, which may never reap them): {adopted[:20]}"
                )
            for mode, task in handles:
                try:
                    error = task.exception(timeout=10)
                except TimeoutError:
                    self.report.violations.append(f"burst task {task.id} ({mode}): no outcome")
                    continue
                outcome = classify(error, None if error else task.result(timeout=0))
                self.counts[f"burst:{outcome[0]}:{outcome[1]}"] += 1
                if outcome[:2] not in (("cancelled", "ServerShuttingDown"), ("completed", "")):
                    self.report.violations.append(
                        f"burst task {task.id} ({mode}) ended {outcome[:3]} when the broker "
                        "stopped; expected cancelled ServerShuttingDown"
                    )
        finally:
            burst.close()
        # An exception that escaped a handler is a bug even when nothing else noticed it.
        log = broker.log_text()
        for needle in ("Traceback", "Exception in callback", "InternalError", "CRITICAL"):
            if needle in log:
                at = log.index(needle)
                self.report.violations.append(
                    f"the broker log has {needle!r}: ...{log[max(0, at - 1500) : at + 2500]}"
                )
                break
        # Nothing it started may outlive it: workers, grandchildren, escapees.
        deadline = time.monotonic() + 10
        while (left := marked_processes(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            described = []
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    described.append((proc.pid, proc.name(), proc.status(), proc.ppid()))
                    proc.kill()
            self.report.violations.append(f"processes outlived the broker: {described[:20]}")
        for path in self.pids_dir.glob("*.[0-9]"):
            with contextlib.suppress(ValueError, OSError):
                pid, started = (int(x) for x in path.read_text().split())
                if alive(pid) and starttime(pid) == started:
                    self.report.violations.append(f"spawned process {pid} ({path.name}) lives on")

    def cleanup(self) -> None:
        if self.reloading is not None:
            self.reloading[0].kill()
            self.reloading[0].wait()
        if self.db is not None:
            self.db.close()
        for proc in self.ledger + self.victims:
            if proc.process.poll() is None:
                proc.process.kill()
            proc.process.wait()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.monitor is not None:
            self.monitor.close()
        if self.broker is not None:
            if self.report.violations:
                with contextlib.suppress(OSError):
                    shutil.copy(self.broker.log, self.run_dir / "broker.log")
                    shutil.copy(self.broker.directory / "stderr.txt", self.run_dir / "stderr.txt")
            self.broker.cleanup()
        for leftover in marked_processes(self.marker):
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        if self.report.violations:
            self.report.kept = self.run_dir
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run the chaos harness with ``config``; the report lists counts and violations."""
    report = ChaosReport(seed=config.seed)
    harness = Harness(config, report)
    started = time.monotonic()
    try:
        harness.run()
    finally:
        report.elapsed = time.monotonic() - started
        harness.cleanup()
    return report


def _describe(process: psutil.Process) -> tuple[int, str, str, str]:
    """A child for the report: pid, name, state, and its age and command line."""
    try:
        age = time.time() - process.create_time()
        command = " ".join(process.cmdline())[:120]
        return (process.pid, process.name(), str(process.status()), f"{age:.1f} s old: {command}")
    except psutil.Error as err:
        return (process.pid, "", "", str(err))
