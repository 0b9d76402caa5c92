"""What a task leaves behind in its worker: the baseline check, on this very process."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.cleanliness import Baseline

# pytest-timeout's default method arms an interval timer, which the check reports.
pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.fixture
def baseline() -> Baseline:
    """Taken by ``clean()`` in the test itself: pytest changes the environment
    (PYTEST_CURRENT_TEST) between a fixture's setup and the test's call."""
    before = set(threading.enumerate())
    return Baseline(ignore_thread=lambda thread: thread in before)


def clean(baseline: Baseline) -> Baseline:
    baseline.take()
    assert baseline.leftovers() == []
    return baseline


def _handler(signum: int, frame: object) -> None:
    pass


@pytest.mark.parametrize("handler", [_handler, signal.SIG_IGN], ids=["a Python handler", "SIG_IGN"])
def test_a_changed_signal_handler_is_reported_until_restored(
    baseline: Baseline, handler: Callable[[int, object], None] | signal.Handlers
) -> None:
    clean(baseline)
    old = signal.signal(signal.SIGUSR2, handler)
    try:
        assert baseline.leftovers() == ["changed signal handler(s): SIGUSR2"]
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert baseline.leftovers() == []


def test_an_environment_variable_set_or_removed_is_reported(
    baseline: Baseline, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean(baseline)
    monkeypatch.setenv("PBT_TEST_LEFTOVER", "1")
    assert baseline.leftovers() == ["a changed environment"]
    monkeypatch.delenv("PBT_TEST_LEFTOVER")
    assert baseline.leftovers() == []
    name = next(iter(os.environ))
    monkeypatch.delenv(name)
    assert baseline.leftovers() == ["a changed environment"]
    monkeypatch.undo()
    assert baseline.leftovers() == []


def test_a_changed_value_of_a_variable_is_reported(
    baseline: Baseline, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean(baseline)
    name = next(iter(os.environ))
    monkeypatch.setenv(name, os.environ[name] + "x")
    assert baseline.leftovers() == ["a changed environment"]


def test_a_changed_working_directory_and_umask_are_reported(
    baseline: Baseline, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean(baseline)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o077)
    try:
        found = baseline.leftovers()
    finally:
        os.umask(old)
    assert found[0].startswith("a changed working directory")
    assert found[1:] == ["a changed umask"]


def test_a_thread_still_running_is_reported(baseline: Baseline) -> None:
    clean(baseline)
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="left-running")
    thread.start()
    try:
        assert baseline.leftovers() == ["thread(s) still running: left-running"]
    finally:
        release.set()
        thread.join()
    assert baseline.leftovers() == []
