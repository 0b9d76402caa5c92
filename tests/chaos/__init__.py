"""The chaos harness: many sessions, misbehaving codeunits, killed and frozen workers, dropped
clients, and a ledger per session that checks every promise the server makes.

- ``ledger.py``: what one session saw (tasks, raw broker frames, triggers, notifications)
  and its checks; pure, unit-tested in ``tests/unit/test_chaos_ledger.py``.
- ``episodes.py``: the driver of one session's life, written once over a small adapter for
  the asyncio and the blocking client.
- ``client.py``: a client process (``python -m tests.chaos.client``) running episodes on
  concurrent lanes.
- ``tamper.py``: the relay that injects faults into what a client receives (the ledger's
  self-test).
- ``harness.py``: the broker, the clients, the worker kills and freezes, the database
  writes and reloads, the checks across clients and the final checks.

Checked (a violation names the seed, client, session, task and what was seen):

- every accepted task got exactly one outcome (completed / error / cancelled, or
  ConnectionLost for a connection we broke on purpose): none lost, none twice, none after a
  cancel; the handle's outcome never changes; the broker sent at most one outcome event per
  task, on the task's own page;
- completed results echo the task's own identity (token, page, record; the broker's task and
  session ids as the codeunit saw them), and each mode ends the way it must (a crashing mode
  never completes, a raising one fails with its own token in the text, ...); crashes and
  timeouts of well-behaved modes are counted and may not exceed the harness's kills + stops;
- triggers run at most once, only for completed / failed tasks, on the enqueuing page, never
  after that page moved to another record or closed; notifications match unhandled errors;
- shared codeunits (``shared=True``, ``per_context=True``, ``cache=True``, a few parameter
  sets, so that many sessions' tasks attach to one execution): each attached task gets one
  outcome like any other, its results are its execution's (its parameters, the shared
  session, the context only for ``per_context``), and across all clients the tasks of one
  execution got the same results; an execution's snapshot holds every write the harness
  committed before it began; a task enqueued after its execution's outcome had reached a
  client was served from the cache, only by ``cache=True``, and only if the harness wrote
  nothing since that execution began;
- progress: only from the ``progress`` mode, on the task's own page, never going
  backwards, a shared task's from its own execution; no progress event after the outcome
  event; ``on_progress`` never before the TaskId was returned, after the outcome was on the
  handle, after the trigger, after a cancel or once the page moved on; every
  ``progress_updates()`` iteration (asyncio) yields nothing once the outcome has arrived
  and ends by itself;
- reloads (``pbt-server reload`` and SIGHUP, with another pool size, CancelGrace and
  ProgressInterval) lose no session and no task, and nobody sees ``ServerShuttingDown``
  (both are violations anywhere but at the final stop); a task enqueued after a reload had
  completed runs the new code (the codeunits return the generation of the code that ran);
- after ``cancel()``, ``set_record()``, ``page.close()``, ``session.close()`` return (or the
  connection is broken), the affected handles are already resolved with the right code;
- at the end: the broker settles (no session, task or shared execution left), its
  ``/metrics`` count each codeunit's tasks exactly as the ledgers saw them, it still
  completes a fresh task, its RSS did not keep growing, and after it stops no worker,
  grandchild or zombie remains.

Cancelled running tasks go through ``CancelGrace`` (50 ms by default: the worker finishes
aside and is reused, or is killed past the grace); workers are SIGKILLed and SIGSTOPped
meanwhile.

Run it with ``scripts/chaos.py`` (or ``run_chaos(ChaosConfig(...))``).
"""

from tests.chaos.harness import ChaosConfig, ChaosReport, run_chaos

__all__ = ["ChaosConfig", "ChaosReport", "run_chaos"]
