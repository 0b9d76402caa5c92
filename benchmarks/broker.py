"""The benchmark's broker: ``python -m pbt_server run --daemon`` on a throwaway directory.

Deliberately its own small launcher rather than ``tests/broker_process.py``: the published
benchmark must run without the test tree (and its imports), its readiness probe speaks the
benchmark's own framing (a baseline must not depend on the code it measures), and its
brokers differ on purpose: ``--daemon`` (logging only to the file, as ``pbt-server start``
runs), no ``PBT_*`` variables inherited, and a SIGTERM when the benchmark dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from benchmarks.cells import die_with_parent, killpg
from benchmarks.framing import frame, take_frames
from benchmarks.timing import BenchError, wait_for
from pbt_server.protocol import PROTOCOL_VERSION

REPO: Final = Path(__file__).resolve().parent.parent
Settings = Mapping[str, Mapping[str, str]]
CUSTOMERS: Final = 1_000  # rows of the database's customer table (the role center's cues read it)

BROKER_BASE: Final[dict[str, dict[str, str]]] = {
    "Workers": {"Count": "2"},
    "Server": {"LogLevel": "INFO"},
    "Codeunits": {"Modules": "benchmarks.codeunits"},
}


def merge(*layers: Settings) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)
    return merged


@dataclass
class BrokerProcess:
    name: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def socket(self) -> str:
        return str(self.directory / "pbt.sock")

    @property
    def log(self) -> str:
        return str(self.directory / "pbt.log")

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, name: str, settings: Settings, root: Path, repo: Path = REPO) -> BrokerProcess:
        """A broker with ``BROKER_BASE`` + ``settings``, its files under ``root``; the
        ``pbt_server`` it runs is ``repo``'s (``benchmarks/breakdown.py`` compares trees)."""
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        with sqlite3.connect(directory / "bench.db") as db:
            db.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT)")
            db.executemany(
                "INSERT INTO customer (name) VALUES (?)",
                ((f"Customer {i:05d}",) for i in range(CUSTOMERS)),
            )
        db.close()
        own = {
            "Server": {
                "SocketPath": str(directory / "pbt.sock"),
                "PidFile": str(directory / "pbt.pid"),
                "LogFile": str(directory / "pbt.log"),
            },
            "Database": {"Url": f"sqlite:///{directory}/bench.db"},
        }
        lines = []
        for section, keys in merge(BROKER_BASE, own, settings).items():
            lines += [f"[{section}]", *(f"{key} = {value}" for key, value in keys.items())]
        ini = directory / "server.ini"
        ini.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
        with open(directory / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "pbt_server", "run", "--daemon", "--config", str(ini)],
                cwd=repo,  # the working directory is importable: benchmarks.codeunits
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),
            )
        broker = cls(name, directory, process)
        try:
            wait_for(f"broker {name!r} to accept connections", broker._ready, 30)
        except BaseException:
            broker.stop()
            raise
        return broker

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise BenchError(f"broker {self.name!r} exited: {self.log_tail()}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(self.socket)
                sock.sendall(frame({"op": "hello", "rid": 1, "protocol": PROTOCOL_VERSION}))
                buffer = bytearray()
                while not (frames := take_frames(buffer)):
                    data = sock.recv(4096)
                    if not data:
                        return False
                    buffer += data
                return bool(frames[0].get("op") == "reply")
        except OSError:
            return False

    def log_tail(self) -> str:
        text = ""
        for name in ("pbt.log", "stderr.txt"):
            with contextlib.suppress(OSError):
                text += (self.directory / name).read_text()[-3000:]
        return text

    def stop(self) -> None:
        """SIGTERM and wait (graceful); SIGKILL the group and any worker left if that fails."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                killpg(self.pid)
                self.process.wait()
        killpg(self.pid)
        for child in children:  # workers run in their own process groups
            with contextlib.suppress(psutil.Error):
                child.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
