"""Logging for the broker and its workers.

- The broker's own records go through a ``QueueHandler`` to a listener thread that writes the
  file, so the event loop never waits on the disk.
- Worker records reach the same file through multiprocessing-logging: the broker builds one
  ``MultiProcessingHandler`` before forking, and each worker makes it its only handler.
  Records from a worker killed mid-write may be lost (package-notes §1.5), which is why the
  broker logs every task's fate itself.
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
        self.worker_handler = multiprocessing_logging.MultiProcessingHandler(
            "pbt-worker-logs", sub_handler=_Forward(self.outputs)
        )
        self.worker_handler.setLevel(level)
        record_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.listener = logging.handlers.QueueListener(
            record_queue, *self.outputs, respect_handler_level=True
        )
        self.listener.start()
        self.root = logging.getLogger()
        self.saved = (self.root.level, list(self.root.handlers))
        self.root.handlers = [logging.handlers.QueueHandler(record_queue)]
        self.root.setLevel(level)

    def close(self) -> None:
        self.root.handlers = self.saved[1]
        self.root.setLevel(self.saved[0])
        self.worker_handler.close()
        self.listener.stop()
        for handler in self.outputs:
            handler.close()
