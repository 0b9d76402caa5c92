"""Test helpers: polling with a deadline (never a blind sleep) and a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.005
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def recorder(
    calls: list[tuple[Any, ...]], *, handled: bool, tag: str | None = None
) -> Callable[..., bool]:
    """An ``on_error`` trigger that records its arguments and returns ``handled``."""

    def trigger(*args: Any) -> bool:
        calls.append((tag, *args) if tag else args)
        return handled

    return trigger


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
