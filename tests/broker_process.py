"""A real broker in its own process, started through the real CLI (``python -m pbt_server run``)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil

from pbt_server.client import Session, connect
from pbt_server.errors import ConnectionLost
from tests.support import wait_until

REPO = Path(__file__).resolve().parent.parent

BASE_SETTINGS: dict[str, dict[str, str]] = {
    "Workers": {"Count": "2"},
    "Codeunits": {"Modules": "tests.codeunits"},
    "Server": {"LogLevel": "DEBUG"},
}


def make_database(path: Path, customers: int = 50) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, blocked INTEGER)")
        db.executemany(
            "INSERT INTO customer (name, blocked) VALUES (?, ?)",
            [(f"Customer {i}", int(i % 5 == 0)) for i in range(customers)],
        )
    db.close()


def write_ini(path: Path, settings: Mapping[str, Mapping[str, str]]) -> None:
    lines = []
    for section, keys in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")


def merge(*layers: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)
    return merged


@dataclass
class BrokerProcess:
    directory: Path
    config: Path
    socket: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    nofile: int | None = None  # the broker's open-file limit, if not inherited
    run_args: tuple[str, ...] = ()  # more arguments of `run` (--reload)
    process: subprocess.Popen[bytes] | None = None
    seen_workers: set[int] = field(default_factory=set)
    RUNNER: ClassVar[tuple[str, ...]] = ("-m", "pbt_server")  # python's arguments before `run`

    @classmethod
    def start(
        cls,
        settings: Mapping[str, Mapping[str, str]] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
        run_args: tuple[str, ...] = (),
    ) -> BrokerProcess:
        """Start a broker on a fresh directory and database; ``env`` adds variables to the
        environment it (and every process it starts) inherits."""
        directory = Path(tempfile.mkdtemp(prefix="pbt-", dir="/tmp"))  # short: AF_UNIX paths
        make_database(directory / "test.db")
        own = {
            "Server": {
                "SocketPath": str(directory / "pbt.sock"),
                "PidFile": str(directory / "pbt.pid"),
                "LogFile": str(directory / "pbt.log"),
            },
            "Database": {"Url": f"sqlite:///{directory}/test.db"},
        }
        config = directory / "server.ini"
        merged = merge(BASE_SETTINGS, own, settings or {})
        write_ini(config, merged)
        broker = cls(
            directory,
            config,
            Path(merged["Server"]["SocketPath"]),
            Path(merged["Server"]["LogFile"]),
            dict(env or {}),
            nofile,
            run_args,
        )
        try:
            broker.launch()
        except BaseException:
            broker.cleanup()
            raise
        return broker

    def launch(self) -> None:
        with open(self.directory / "stderr.txt", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, *self.RUNNER, "run", "--config", str(self.config), *self.run_args],
                cwd=REPO,
                env=dict(os.environ, **self.env) if self.env else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=self._limit if self.nofile is not None else None,
            )
        wait_until(self._ready, timeout=30)
        self.seen_workers |= set(self.worker_pids())

    def _limit(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"broker exited with {self.process.returncode}:\n{self.log_text()}"
            )
        try:
            with connect(str(self.socket), timeout=1) as session:
                session.ping()
            return True
        except (ConnectionLost, OSError):
            return False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def connect(self, **kwargs: Any) -> Session:
        return connect(str(self.socket), **kwargs)

    def status(self) -> dict:
        with connect(str(self.socket), operator=True) as session:  # works when full, too
            return session.status()

    def worker_pids(self) -> list[int]:
        pids = [w["pid"] for w in self.status()["workers"] if w["pid"]]
        self.seen_workers |= set(pids)
        return pids

    def wait_workers_replaced(self, old: int) -> list[int]:
        """Wait until ``old`` is no longer a worker and every slot has a live one."""

        def replaced() -> list[int] | None:
            status = self.status()["workers"]
            pids = [w["pid"] for w in status]
            if old in pids or not all(w["state"] in ("idle", "busy") for w in status):
                return None
            return pids

        pids: list[int] = wait_until(replaced)
        self.seen_workers |= set(pids)
        return pids

    def log_text(self) -> str:
        try:
            return self.log.read_text() + (self.directory / "stderr.txt").read_text()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, *texts: str, timeout: float = 20) -> str:
        """The log once it holds every one of ``texts``: the broker's records reach the
        file a few ms after they are logged, so a test waits for them."""
        found = ""

        def holds_all() -> bool:
            nonlocal found
            found = self.log_text()
            return all(text in found for text in texts)

        wait_until(holds_all, timeout=timeout)
        return found

    def stop(self) -> int:
        """SIGTERM, wait; then check that no worker outlived the broker."""
        assert self.process is not None
        if self.process.poll() is None:
            self.seen_workers |= set(self._children())
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError(
                    f"broker did not stop on SIGTERM:\n{self.log_text()}"
                ) from None
        wait_until(lambda: not [p for p in self.seen_workers if alive(p)], timeout=10)
        return self.process.returncode

    def _children(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
