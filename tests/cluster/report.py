"""How the scenarios report: one line per check (PASS, FAIL, SKIP, XFAIL), numbers kept for
the end, and polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def _line(self, status: str, name: str, detail: str) -> None:
        self.checks.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self._line("PASS" if ok else "FAIL", name, detail)
        return ok

    def skip(self, name: str, why: str) -> None:
        self._line("SKIP", name, why)

    def known_failure(self, name: str, ok: bool, detail: str, why: str) -> None:
        """A check that fails today for a reason in the product (``why``): XFAIL, not a
        failure. Once it passes it is reported as a failure, so that someone turns it into a
        plain check (pytest's strict xfail)."""
        if ok:
            self._line("FAIL", name, f"passes now ({detail}): make it a plain check")
        else:
            self._line("XFAIL", name, f"{detail}; known: {why}")

    def number(self, key: str, value: Any) -> None:
        self.numbers[key] = value

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for status, _, _ in self.checks)

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"--- {name}", flush=True)
        try:
            yield
        except Exception as err:
            self._line("FAIL", name, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        self.numbers.setdefault("scenario_seconds", {})[name] = round(time.monotonic() - started, 1)


async def eventually(predicate: Callable[[], object], within: float, what: str) -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail after ``within`` s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
