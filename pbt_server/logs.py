"""Logging for the broker and its workers.

- The broker's own records go through a ``QueueHandler`` to a listener thread that writes the
  file, so the event loop never waits on the disk.
- Worker records reach the same file through multiprocessing-logging. Each worker gets its
  **own** ``MultiProcessingHandler`` (its own queue and lock), built by the broker just before
  the fork. With one shared handler, a worker SIGKILLed while its feeder thread held the
  queue's lock wedged every worker's logging for good (package-notes §1.5; reproduced on the
  first kill). Now a kill can only lose that worker's last records: its queue dies with it.
  That loss is why the broker logs every task's fate itself.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import queue
import sys
from pathlib import Path

import multiprocessing_logging

FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


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


class BrokerLogging:
    """The handlers of one broker run; ``close`` flushes and stops their threads."""

    def __init__(self, log_file: Path, level: str, *, to_stderr: bool) -> None:
        # multiprocessing-logging refuses any start method but fork (package-notes §0.1);
        # set it before the handler exists. Python 3.14 would otherwise default to forkserver.
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter(FORMAT)
        self.outputs: list[logging.Handler] = [logging.FileHandler(log_file, encoding="utf-8")]
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
        self.root.handlers = [logging.handlers.QueueHandler(record_queue)]
        self.root.setLevel(level)

    def worker_handler(self, name: str) -> logging.Handler:
        """A new handler (queue + receiver thread) for the worker about to be forked."""
        handler = multiprocessing_logging.MultiProcessingHandler(name, sub_handler=self._forward)
        handler.setLevel(self.level)
        return handler

    def close(self) -> None:
        self.root.handlers = self.saved[1]
        self.root.setLevel(self.saved[0])
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
