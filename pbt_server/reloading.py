"""Reload: ``server.ini`` and the codeunit modules again, without losing a session or a task.

::

    pbt-server reload ─┐ (operator request)     1. read server.ini again (ConfigError: refused)
    SIGHUP ────────────┼──▶ Reloader.reload ──▶ 2. keep the running value of every key a
    run --reload ──────┘    (one at a time)        reload cannot apply (restart keys)
      (a module file                            3. pool.trial: a fresh process imports the new
       changed)                                    modules and opens the database; refused if
                                                   either fails (the running code stays)
                                                4. the broker imports it too (compiled by
                                                   now: a few ms), so every later fork has it
                                                5. broker.apply: limits for new enqueues,
                                                   the new registry, pool.renew (idle workers
                                                   retired now, busy ones after their task)

A module that crashes, hangs or exits at import harms only the trial process, and the broker
imports only what imported cleanly there. Workers are still forked from the broker, so a
replacement costs a fork, and every worker runs the code of the last reload, whatever the
files say later (a deploy that is not yet reloaded does not leak into replacements).
Sessions, pages, waiting and running tasks are untouched; running tasks finish on the old
code, and the next task a worker takes runs the new code. A task that waits for a codeunit
the new code no longer registers fails with ``UnknownCodeunit`` when its turn comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pbt_server import systemd
from pbt_server.codeunits import application_packages, module_files
from pbt_server.config import load_config, reloaded
from pbt_server.errors import ConfigError, ReloadFailed
from pbt_server.events import Event, event
from pbt_server.pool import reimage_workers
from pbt_server.protocol import Message

if TYPE_CHECKING:
    from pbt_server.broker import Broker

TRIAL_LIMIT: Final = 60.0  # seconds the new code may take to import and open the database
WATCH_INTERVAL: Final = 1.0  # seconds between looks at the module files (run --reload)

log = logging.getLogger("pbt_server.reload")

Stamp = tuple[int, int] | None  # (mtime_ns, size) of a file; None: it is gone


class Reloader:
    """Runs the broker's reloads one at a time, and (``run --reload``) watches the files."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Message]] = set()
        modules = broker.config.codeunits.modules
        self._files = module_files(application_packages(modules))
        self._stamps: dict[str, Stamp] = {}
        self._watcher: asyncio.TimerHandle | None = None

    def start(self, why: str) -> asyncio.Task[Message]:
        """Reload in the background; the task's result is the reply to ``reload``."""
        task = asyncio.ensure_future(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def watch(self) -> None:
        """``run --reload``: from now on, reload when a watched file changes."""
        self._stamps = _stamps(self._watched())
        self._watcher = self.broker.loop.call_later(WATCH_INTERVAL, self._look)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def reload(self, why: str) -> Message:
        """Reload now (after any reload under way); the reply says what changed.

        Raises:
            ReloadFailed: nothing was changed; the text says why.
        """
        async with self._lock:
            started = time.monotonic()
            systemd.reloading()
            try:
                reply = await self._reload(started)
            except ReloadFailed as err:
                systemd.ready(f"reload refused, running the previous code: {err.text:.200}")
                event(log, logging.ERROR, Event.RELOAD_FAILED, "reload (%s) refused: %s", why, err)
                raise
            except Exception as err:  # a bug of ours, or the OS refused a fork
                systemd.ready("reload failed, running the previous code")
                log.exception("reload (%s) failed", why)
                raise ReloadFailed(f"the reload failed: {err!r:.300}") from err
            systemd.ready(f"reloaded: {len(reply['codeunits'])} codeunit(s)")
            event(
                log,
                logging.INFO,
                Event.RELOADED,
                "reloaded (%s) in %.0f ms: %d codeunit(s)%s",
                why,
                reply["seconds"]["total"] * 1000,
                len(reply["codeunits"]),
                f"; changed, but applied only by a restart: {', '.join(reply['restart'])}"
                if reply["restart"]
                else "",
            )
            self.broker.retune_log()  # after the line above: a higher LogLevel would hide it
            return reply

    async def _reload(self, started: float) -> Message:
        broker = self.broker
        if broker.stopping:
            raise ReloadFailed("the server is stopping")
        running = broker.config
        try:
            new = load_config(running.source, base_dir=running.base_dir)
        except ConfigError as err:
            raise ReloadFailed(err.text) from None
        config, restart = reloaded(running, new)
        modules = config.codeunits.modules
        # The old modules are forgotten as well, so a module taken out of the list is gone.
        prefixes = application_packages((*running.codeunits.modules, *modules))
        tried = await broker.pool.trial(modules, prefixes, config.database, TRIAL_LIMIT)
        trial_done = time.monotonic()
        if broker.stopping:
            raise ReloadFailed("the server is stopping")
        try:
            image = reimage_workers(broker.pool.image, modules, prefixes, config.database)
        except ImportError as err:
            raise ReloadFailed(f"{err} (after the trial: did a file change meanwhile?)") from None
        imported = time.monotonic()
        broker.apply(config, image)
        self.reloads += 1
        self._files = tried["files"]
        if self._watcher is not None:
            self._stamps = _stamps(self._watched())
        return {
            "codeunits": tried["codeunits"],
            "restart": restart,
            "seconds": {
                "trial": round(trial_done - started, 4),
                "import": round(imported - trial_done, 4),
                "total": round(time.monotonic() - started, 4),
            },
        }

    # --- run --reload ---------------------------------------------------------------------

    def _watched(self) -> list[str]:
        source = self.broker.config.source
        return [*self._files, *([str(source)] if source is not None else [])]

    def _look(self) -> None:
        """Every second: reload when a module file or server.ini changed (a few µs a file)."""
        self._watcher = self.broker.loop.call_later(WATCH_INTERVAL, self._look)
        if self._lock.locked() or self.broker.stopping:
            return
        stamps = _stamps(self._watched())
        changed = [path for path, stamp in stamps.items() if self._stamps.get(path) != stamp]
        if not changed:
            return
        # Taken now: a broken file is reported once, and reloaded again when it changes.
        self._stamps = stamps
        names = ", ".join(os.path.basename(path) for path in changed[:3])
        self.start(f"{names} changed").add_done_callback(consume)


def _stamps(paths: Iterable[str]) -> dict[str, Stamp]:
    stamps: dict[str, Stamp] = {}
    for path in paths:
        try:
            st = Path(path).stat()
        except OSError:
            stamps[path] = None
        else:
            stamps[path] = (st.st_mtime_ns, st.st_size)
    return stamps


def consume(task: asyncio.Task[Message]) -> None:
    """Done callback of a reload nobody waits for."""
    # The outcome is in the log already (RELOADED or RELOAD_FAILED).
    if not task.cancelled():
        task.exception()
