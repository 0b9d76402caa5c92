"""``pbt-server demo``: the two seed examples, run for real through client, broker and workers.

1. Creates the demo database (``[Database] Url``, ``var/demo.db`` by default) if it is missing.
2. Uses the server already listening on ``SocketPath``, or starts one for the demo and stops
   it afterwards.
3. The Role Center cue: renders ``-`` at once, keeps the "page" responsive while codeunit
   ``BackgroundTask`` counts blocked customers, then renders the count.
4. The Customer Card: codeunit 50100 ``Wait`` enqueued with timeout 10000 and ErrorLevel
   Warning; then the record changing before it finishes (cancelled, no trigger); then a
   task that exceeds its timeout (error trigger with ``ChildSessionTaskTimeout``).
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pbt_server.client import BackgroundTaskCanceled, ErrorLevel, Notification, Session, connect
from pbt_server.config import ServerConfig, load_config
from pbt_server.demo_ids import BLOCKED_CUSTOMERS, WAIT
from pbt_server.errors import ConnectionLost

CUSTOMERS = 5000
BLOCKED = ("Ship", "Invoice", "All")


def create_database(path: Path, customers: int = CUSTOMERS) -> int:
    """Create the demo database at ``path``; return how many customers are blocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(50100)
    rows = [
        (
            f"C{10000 + 10 * i:05d}",
            f"Customer {i}",
            rng.choice(BLOCKED) if rng.random() < 0.07 else "",
        )
        for i in range(customers)
    ]
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as db:
        db.execute(
            "CREATE TABLE customer (no TEXT PRIMARY KEY, name TEXT NOT NULL, blocked TEXT NOT NULL)"
        )
        db.executemany("INSERT INTO customer (no, name, blocked) VALUES (?, ?, ?)", rows)
    db.close()
    tmp.replace(path)
    return sum(1 for row in rows if row[2])


def main(config_path: Path | None) -> int:
    config = load_config(config_path)
    ensure_database(config)
    with _server(config, config_path) as session:
        _role_center_cue(session)
        _customer_card(session)
    return 0


@contextmanager
def _server(config: ServerConfig, config_path: Path | None) -> Iterator[Session]:
    socket = str(config.server.socket_path)
    with running_broker(config, config_path) as started:
        if not started:
            print(f"using the pbt-server already running on {socket}")
        with connect(socket) as session:
            yield session


def ensure_database(config: ServerConfig) -> None:
    """Create the demo database if the configured SQLite file is missing."""
    db_path = config.database.url.path
    if db_path is not None and not db_path.exists():
        blocked = create_database(db_path)
        print(f"created demo database {db_path}: {CUSTOMERS} customers, {blocked} blocked")


@contextmanager
def running_broker(config: ServerConfig, config_path: Path | None) -> Iterator[bool]:
    """Use the server listening on ``SocketPath``, or start one and stop it at the end.

    Yields whether it started one.
    """
    socket = str(config.server.socket_path)
    try:
        connect(socket, timeout=2).close()
    except ConnectionLost:
        pass
    else:
        yield False
        return
    command = [sys.executable, "-m", "pbt_server", "run", "--daemon"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        _connect_when_ready(server, socket).close()
        print(f"started pbt-server (pid {server.pid}) on {socket}; log: {config.server.log_file}")
        yield True
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        print(f"stopped pbt-server (exit code {code})")


def _connect_when_ready(server: subprocess.Popen[bytes], socket: str) -> Session:
    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            raise SystemExit(f"pbt-server failed to start (exit code {server.returncode})")
        try:
            return connect(socket, timeout=1)
        except ConnectionLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _role_center_cue(session: Session) -> None:
    print("\n== Role Center cue: blocked customers, computed in a page background task ==")
    cue: dict[str, str] = {"BlockedCustomers": "-"}
    filled = threading.Event()
    page = session.open_page("Business Manager Role Center")

    def on_completed(task_id: int, results: dict[str, str]) -> None:
        cue.update(results)
        filled.set()

    page.on_completed = on_completed
    opened = time.perf_counter()
    page.enqueue_background_task(BLOCKED_CUSTOMERS, {"Delay": "1500"})
    print(f"  {_ms(opened)}  page rendered:  Blocked customers [{cue['BlockedCustomers']}]")
    ticks = 0
    while not filled.wait(0.25):  # the "user" keeps working; the page never blocks
        ticks += 1
        print(f"  {_ms(opened)}  page responsive: user action #{ticks} handled")
    print(f"  {_ms(opened)}  cue filled:     Blocked customers [{cue['BlockedCustomers']}]")
    page.close()


def _customer_card(session: Session) -> None:
    print("\n== Customer Card: codeunit 50100 'Wait', timeout 10000, ErrorLevel Warning ==")
    notes: list[Notification] = []
    session.on_notification = notes.append
    page = session.open_page("Customer Card", record_id="Customer: C10000")
    events: list[str] = []
    page.on_completed = lambda task_id, r: events.append(
        f"OnPageBackgroundTaskCompleted(task {task_id}): Before {r['Before']}, "
        f"Duration {r['Duration']}, After {r['After']}"
    )

    def on_error(task_id: int, code: str, text: str, call_stack: str) -> bool:
        events.append(f"OnPageBackgroundTaskError(task {task_id}): {code}: {text}")
        return False  # not handled: surfaces as a notification of the task's ErrorLevel

    page.on_error = on_error

    started = time.perf_counter()
    task = page.enqueue_background_task(
        WAIT, {"Wait": "1000"}, timeout=10000, error_level=ErrorLevel.WARNING
    )
    task.result(timeout=30)
    _wait_for(lambda: events)
    print(f"  {_ms(started)}  {events.pop(0)}")

    print("  -- the record changes before the task finishes --")
    task = page.enqueue_background_task(
        WAIT, {"Wait": "3000"}, timeout=10000, error_level=ErrorLevel.WARNING
    )
    time.sleep(0.3)
    page.set_record("Customer: C10010")
    try:
        task.result(timeout=30)
    except BackgroundTaskCanceled as err:
        print(f"  task {task.id} cancelled ({err.code}); no trigger ran: {not events}")

    print("  -- a task that exceeds its timeout (Wait 3000 ms, timeout 1000 ms) --")
    started = time.perf_counter()
    task = page.enqueue_background_task(
        WAIT, {"Wait": "3000"}, timeout=1000, error_level=ErrorLevel.WARNING
    )
    error = task.exception(timeout=30)
    _wait_for(lambda: events and notes)
    print(f"  {_ms(started)}  {events.pop(0)}")
    print(f"  notification ({notes[0].severity.value}): {notes[0].code}: {notes[0].text}")
    if error is None or error.code != "ChildSessionTaskTimeout":
        raise SystemExit(f"demo: expected ChildSessionTaskTimeout, got {error!r}")
    page.close()


def _wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo's trigger did not run")
        time.sleep(0.01)


def _ms(since: float) -> str:
    return f"{(time.perf_counter() - since) * 1000:7.1f} ms"
