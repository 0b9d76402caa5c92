"""The chaos harness (tests/chaos/, run by scripts/chaos.py) in its quick mode, and proof
that its ledger bites.

The quick run mixes fast, slow, spinning, crashing, raising, progress-reporting and
process-spawning codeunits, shared and cached ones, with worker SIGKILLs and SIGSTOPs,
killed client processes, dropped connections, cancels racing completion, record changes,
database writes and reloads; see ``tests/chaos/__init__.py`` for what it checks.
``PBT_CHAOS_SEED`` picks another seed (the report prints the one used).
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import chaos

SEED = int(os.environ.get("PBT_CHAOS_SEED", "20251124"))


@pytest.mark.timeout(600)
def test_quick_chaos_run_keeps_every_promise() -> None:
    report = chaos.run_chaos(chaos.ChaosConfig.quick(seed=SEED))
    print(report.summary())
    assert report.ok, report.summary()
    counts = report.counts
    # The run did what it is for: every kind of outcome and of mischief happened.
    assert counts["accepted"] >= 6000
    assert counts["outcome:completed"] > 0
    assert counts["error:CHAOS:Raised"] > 0
    assert counts["error:ChildSessionCrashed"] > 0
    assert counts["error:ChildSessionTaskTimeout"] > 0
    assert counts["cancelled:Canceled"] > 0
    assert counts["cancelled:RecordChanged"] > 0
    assert counts["kills"] > 0
    assert counts["stops"] > 0
    assert counts["victims_killed"] > 0
    assert counts["spawned"] > 0
    # ... and of this round's features: attached and cached shared tasks, progress (callbacks
    # and iterations), data writes that invalidate, reloads.
    assert counts["shared:attached"] > 0
    assert counts["cache:served"] > 0
    assert counts["progress:callbacks"] > 0
    assert counts["progress:yielded"] > 0
    assert counts["writes"] > 0
    assert counts["reloads"] > 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("fault", "symptom"),
    [
        ("duplicate", "the broker sent 2 outcome events"),
        ("misroute", "are not this task's identity"),
        ("drop", "no outcome"),
        ("late_progress", "the broker sent progress after the outcome event"),
    ],
)
def test_the_ledger_catches_injected_faults(fault: str, symptom: str) -> None:
    """Tamper with the events a client receives: the run must report it, by task."""
    config = chaos.ChaosConfig(
        seed=SEED,
        tasks=400,
        sessions=4,
        clients=1,
        sync_clients=0,
        victims=0,
        kill_interval=0,
        stop_interval=0,
        stall_timeout=4.0,
        inject=fault,
    )
    report = chaos.run_chaos(config)
    try:
        assert report.counts[f"injected:{fault}"] > 0, report.summary()
        assert not report.ok
        assert any(symptom in violation for violation in report.violations), report.summary()
        assert all(f"seed {SEED}" in v for v in report.violations if symptom in v)
    finally:
        if report.kept:  # the run directory kept for its (expected) violations
            shutil.rmtree(report.kept, ignore_errors=True)
