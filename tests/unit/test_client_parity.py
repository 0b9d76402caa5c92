"""The blocking and the asyncio client offer one public surface: same names, same
parameters, same first line of documentation; only what a flavour cannot have differs."""

from __future__ import annotations

import inspect

import pytest

from pbt_server import client
from pbt_server.client import aio

# What exists in one flavour only, and why.
BLOCKING_ONLY = {
    "connect": {"dispatch"},  # asyncio triggers run on the loop, between the app's awaits
    "Session": {"process_events", "events_fd"},  # manual dispatch is the blocking kind's
}
DIFFERENT_SIGNATURE = {
    "Session.wait_closed",  # asyncio waits are bounded with asyncio.timeout, not an argument
    "BackgroundTask.progress_updates",  # the same
}


def test_both_flavours_export_the_same_names() -> None:
    assert aio.__all__ == client.__all__
    for name in client.__all__:
        assert hasattr(aio, name), name


@pytest.mark.parametrize("name", ["Session", "Page", "BackgroundTask"])
def test_classes_have_the_same_public_members(name: str) -> None:
    blocking, asynchronous = getattr(client, name), getattr(aio, name)
    members = {m for m in dir(blocking) if not m.startswith("_")}
    expected = members - BLOCKING_ONLY.get(name, set())
    assert {m for m in dir(asynchronous) if not m.startswith("_")} == expected
    for member in sorted(expected):
        one, two = getattr(blocking, member), getattr(asynchronous, member)
        if not callable(one) or f"{name}.{member}" in DIFFERENT_SIGNATURE:
            continue
        assert _parameters(one) == _parameters(two), f"{name}.{member}"
        assert _summary(one) == _summary(two), f"{name}.{member}"


def test_connect_takes_the_same_arguments() -> None:
    blocking = _parameters(client.connect)
    for extra in BLOCKING_ONLY["connect"]:
        blocking.pop(extra)
    assert _parameters(aio.connect) == blocking
    assert _summary(aio.connect) == _summary(client.connect)


def _parameters(function: object) -> dict[str, object]:
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return {name: p.default for name, p in signature.parameters.items()}


def _summary(function: object) -> str:
    return (inspect.getdoc(function) or "").split("\n\n")[0].replace("await ", "")
