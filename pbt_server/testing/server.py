"""A real broker for a test: its own directory, socket, log and pid file, stopped after."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pbt_server.client import Session, connect
from pbt_server.errors import PbtError

Settings = Mapping[str, Mapping[str, str]]


def merge(*layers: Settings) -> dict[str, dict[str, str]]:
    """``server.ini`` settings, later layers winning key by key."""
    merged: dict[str, dict[str, str]] = {}
    for layer in layers:
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)
    return merged


def write_ini(path: Path, settings: Settings) -> None:
    lines = []
    for section, keys in settings.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class ServerProcess:
    """``python -m pbt_server run`` with ``settings``, in a directory of its own.

    ::

        with ServerProcess({"Codeunits": {"Modules": "myapp.cues"},
                            "Database": {"Url": "sqlite:////srv/app.db"}}) as server:
            with server.connect() as session:
                ...
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        # /tmp, not a deep pytest directory: a Unix socket path has at most 107 bytes
        self.directory = Path(tempfile.mkdtemp(prefix="pbt-test-", dir="/tmp"))
        own = {
            "Server": {
                "SocketPath": str(self.directory / "pbt.sock"),
                "PidFile": str(self.directory / "pbt.pid"),
                "LogFile": str(self.directory / "pbt.log"),
            }
        }
        self.settings = merge(own, settings or {})
        self.config = self.directory / "server.ini"
        write_ini(self.config, self.settings)
        self.socket = Path(self.settings["Server"]["SocketPath"])
        self.log = Path(self.settings["Server"]["LogFile"])
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        """Start the broker; return once it answers (raise with its log if it exits)."""
        with open(self.directory / "stderr.txt", "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pbt_server", "run", "--config", str(self.config)],
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pbt-server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pbt-server did not answer within {self.timeout:g} s")
            time.sleep(0.01)
        return self

    def _answers(self) -> bool:
        try:
            with connect(str(self.socket), timeout=1, operator=True, keepalive=None) as s:
                s.ping()
        except (PbtError, OSError):
            return False
        return True

    def connect(self, **kwargs: Any) -> Session:
        """A session with this broker (``connect``'s keyword arguments apply)."""
        return connect(str(self.socket), **kwargs)

    def log_text(self) -> str:
        parts = []
        for path in (self.log, self.directory / "stderr.txt"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the broker gracefully (SIGKILL after ``timeout``); return its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
