"""Logging for the broker and its workers.

- The broker's own records go through a ``QueueHandler`` to a listener thread that writes the
  file, so the event loop never waits on the disk. A record logged in the event loop is held
  a few ms (:class:`LoopQueueHandler`): the listener formats and writes with the GIL, so
  waking it at once would make a page wait for its outcome, and its next task, behind the
  log lines about them (measured: ~0.5 ms of a crash error's round trip).
- Worker records reach the same file through multiprocessing-logging. Each worker gets its
  **own** ``MultiProcessingHandler`` (its own queue and lock), built by the broker just before
  the fork. With one shared handler, a worker SIGKILLed while its feeder thread held the
  queue's lock wedged every worker's logging for good (reproduced on the first kill: POSIX
  semaphores are not released by a dying process). Now a kill can only lose that worker's
  last records: its queue dies with it. That loss is why the broker logs every task's fate
  itself.
- The log file is opened without following a symbolic link (as the socket and pid file
  are), reopened on ``SIGUSR1`` (after logrotate renamed it), and a write that
  fails (disk full) costs one line on stderr, not a traceback per record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import logging.handlers
import multiprocessing
import os
import queue
import sys
from pathlib import Path
from typing import Any, Final

import multiprocessing_logging

FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The plain format; a worker's record says which task it was logged in."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "pbt", None)
        if fields is not None and fields.get("in_task"):
            record.message = (
                f"[s{fields['session']}/t{fields['task']} codeunit {fields['codeunit']}] "
                f"{record.message}"
            )
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, and the event's fields
    (``event``, ``session``, ``page``, ``task``, ``codeunit``, ``wait_ms``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "pbt", None)
        if fields:
            line.update((k, v) for k, v in fields.items() if k != "in_task")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


FORMATTERS: Final = {"text": TextFormatter, "json": JsonFormatter}


class _Forward(logging.Handler):
    """Hand records to other handlers through ``handle`` (which takes their locks).

    multiprocessing-logging calls its sub-handler's ``emit`` directly from its own thread;
    forwarding keeps that thread and the broker's listener from interleaving in one file.
    """

    def __init__(self, targets: list[logging.Handler]) -> None:
        super().__init__()
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        for target in self.targets:
            if record.levelno >= target.level:
                target.handle(record)


class LogFile(logging.FileHandler):
    """The server's log file: no symlink followed, reopened on request, quiet when it fails."""

    def __init__(self, path: Path) -> None:
        self._failing = False
        self.dropped = 0
        super().__init__(path, encoding="utf-8")

    def _open(self) -> Any:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.baseFilename, flags, 0o640)
        except OSError as err:
            if os.path.islink(self.baseFilename):
                raise OSError(
                    err.errno, f"LogFile {self.baseFilename} is a symbolic link; not following it"
                ) from err
            raise
        return open(fd, "a", encoding=self.encoding)

    def reopen(self) -> None:
        """Close the file; the next record opens the path again (a new file after a rename)."""
        assert self.lock is not None
        with self.lock:
            if self.stream is not None:
                self.stream.close()
            self.stream = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError:
                self.handleError(record)
                return
        logging.StreamHandler.emit(self, record)
        if self._failing and self.stream is not None:
            self._failing = False
            sys.stderr.write(f"pbt-server: writing {self.baseFilename} again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        # A full disk fails every record: say so once, not with a traceback per record.
        self.dropped += 1
        if not self._failing:
            self._failing = True
            err = sys.exc_info()[1]
            sys.stderr.write(
                f"pbt-server: cannot write {self.baseFilename} ({err}); dropping log records"
                " until it works again\n"
            )
        if self.stream is not None:  # try a fresh file handle with the next record
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None


class LoopQueueHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` that, in a running event loop, hands records on ``FLUSH_DELAY``
    later, all that were held at once.

    The record is prepared (its message formatted) at once, so it says what was true when it
    was logged; only the wake-up of the listener waits. Records logged elsewhere (another
    thread, before or after the loop) go to the queue at once, after any held ones. Held
    records keep their order and are never lost to a loop that stops: :meth:`flush` hands
    on what is held, and :class:`BrokerLogging` calls it before stopping the listener.
    """

    FLUSH_DELAY: Final = 0.005

    def __init__(self, record_queue: queue.SimpleQueue[logging.LogRecord]) -> None:
        super().__init__(record_queue)
        self._held: collections.deque[logging.LogRecord] = collections.deque()
        self._flush_due = False

    def enqueue(self, record: logging.LogRecord) -> None:
        loop = asyncio._get_running_loop()
        if loop is None:
            self.flush()
            self.queue.put_nowait(record)
            return
        self._held.append(record)
        if not self._flush_due:
            self._flush_due = True
            loop.call_later(self.FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Hand every held record to the listener, oldest first."""
        self._flush_due = False  # before draining: a record held from now on is flushed again
        held = self._held
        while held:
            self.queue.put_nowait(held.popleft())


class BrokerLogging:
    """The handlers of one broker run; ``close`` flushes and stops their threads."""

    def __init__(
        self, log_file: Path, level: str, *, to_stderr: bool, log_format: str = "text"
    ) -> None:
        # multiprocessing-logging refuses any start method but fork; set it before the
        # handler exists. Python 3.14 would otherwise default to forkserver.
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        formatter = FORMATTERS[log_format]()
        self.file = LogFile(log_file)
        self.outputs: list[logging.Handler] = [self.file]
        if to_stderr:
            self.outputs.append(logging.StreamHandler(sys.stderr))
        for handler in self.outputs:
            handler.setFormatter(formatter)
        self.level = level
        self._forward = _Forward(self.outputs)
        record_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.listener = logging.handlers.QueueListener(
            record_queue, *self.outputs, respect_handler_level=True
        )
        self.listener.start()
        self.root = logging.getLogger()
        self.saved = (self.root.level, list(self.root.handlers))
        self.handler = LoopQueueHandler(record_queue)
        self.root.handlers = [self.handler]
        self.root.setLevel(level)

    def worker_handler(self, name: str) -> logging.Handler:
        """A new handler (queue + receiver thread) for the worker about to be forked."""
        handler = multiprocessing_logging.MultiProcessingHandler(name, sub_handler=self._forward)
        handler.setLevel(self.level)
        return handler

    def retune(self, level: str, log_format: str) -> None:
        """A reload's ``LogLevel`` and ``LogFormat``: the broker's records from now on, and
        those of every worker forked from now on."""
        formatter = FORMATTERS[log_format]()
        for handler in self.outputs:
            handler.setFormatter(formatter)
        self.level = level
        self.root.setLevel(level)

    def reopen(self) -> None:
        """Reopen the log file (after logrotate moved it away)."""
        self.file.reopen()

    def fds(self) -> tuple[int, ...]:
        """The log file's descriptor, which no worker needs."""
        stream = self.file.stream
        return (stream.fileno(),) if stream is not None and not stream.closed else ()

    def close(self) -> None:
        self.root.handlers = self.saved[1]
        self.root.setLevel(self.saved[0])
        self.handler.flush()
        self.listener.stop()
        for handler in self.outputs:
            handler.close()


def queue_fds(handler: logging.Handler) -> tuple[int, ...]:
    """Both ends of a worker handler's queue pipe (a later worker must not inherit them)."""
    queue = getattr(handler, "queue", None)
    if queue is None:
        return ()
    return (queue._reader.fileno(), queue._writer.fileno())


def retire_worker_handler(handler: logging.Handler) -> None:
    """After its worker was reaped: let the receiver thread drain and end, without waiting.

    Closing our copy of the write end leaves the queue with no writer at all, so the thread
    reads what arrived, then EOF, and exits (even after a half-written record, which would
    otherwise block it forever). ``MultiProcessingHandler.close`` would join that thread for
    up to 5 s, in the event loop.
    """
    queue = getattr(handler, "queue", None)
    if queue is not None:
        queue._writer.close()
        handler._is_closed = True  # type: ignore[attr-defined]
    logging.Handler.close(handler)
