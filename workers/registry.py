"""The codeunit registry: integer id -> callable, filled by ``@codeunit`` at import time."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from workers.context import ChildSession

Results = Mapping[str, str] | None
CodeunitFunction = Callable[["ChildSession"], Results]
F = TypeVar("F", bound=CodeunitFunction)


@dataclass(frozen=True, slots=True)
class Codeunit:
    id: int
    name: str
    function: CodeunitFunction

    @property
    def qualname(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


_CODEUNITS: dict[int, Codeunit] = {}


def codeunit(codeunit_id: int, *, name: str | None = None) -> Callable[[F], F]:
    """Register the decorated function as codeunit ``codeunit_id``.

    The function takes the child session (``ctx``) and returns a ``dict[str, str]`` or None.

    Raises:
        ValueError: the id is not a positive int, or another function already has it.
    """
    if type(codeunit_id) is not int or codeunit_id <= 0:
        raise ValueError(f"codeunit id must be a positive int, got {codeunit_id!r}")

    def register(function: F) -> F:
        entry = Codeunit(codeunit_id, name or function.__name__, function)
        known = _CODEUNITS.get(codeunit_id)
        if known is not None and known.qualname != entry.qualname:
            raise ValueError(
                f"codeunit {codeunit_id} is registered twice: {known.qualname} and {entry.qualname}"
            )
        _CODEUNITS[codeunit_id] = entry
        return function

    return register


def lookup(codeunit_id: int) -> Codeunit | None:
    return _CODEUNITS.get(codeunit_id)


def registered() -> Mapping[int, Codeunit]:
    return dict(_CODEUNITS)


def load_modules(modules: Iterable[str]) -> Mapping[int, Codeunit]:
    """Import the ``[Codeunits] Modules``; the working directory is importable, like ``python -m``.

    Raises:
        ImportError: a module cannot be imported (the message names it).
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ImportError(f"cannot import codeunit module {module!r}: {err}") from err
    return registered()
