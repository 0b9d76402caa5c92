"""Codeunits: the ``@codeunit`` registry, and the child session a codeunit receives as ``ctx``.

Application code imports these names from ``pbt_server`` (``from pbt_server import codeunit,
ChildSession, CodeunitError``), which no package of the application's own can shadow;
``from workers import codeunit`` is the same function.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from workers.dbapi import Database

CHILD_SESSION_VARIABLE: Final = "PBT_CHILD_SESSION"  # set in every worker, inherited below it

Results = Mapping[str, str] | None
CodeunitFunction = Callable[["ChildSession"], Results]
F = TypeVar("F", bound=CodeunitFunction)


def in_child_session() -> bool:
    """True inside a worker process, where codeunits run (Business Central's
    ``ClientType::ChildSession``), and in any process a codeunit started: there, starting
    background tasks is refused."""
    return CHILD_SESSION_VARIABLE in os.environ


@dataclass(frozen=True, slots=True, eq=False)
class ChildSession:
    """What a codeunit sees of its task: read-only, no UI, text in and text out.

    Attributes:
        parameters: the task's parameters (read-only mapping of str to str).
        db: the worker's database connection, read-only at the database level.
        task_id: the TaskId the page got from ``enqueue_background_task``.
        session_id: the parent session's id.
        record_id: the page's record id when the task was enqueued.
        codeunit_id: the id this codeunit was registered under.
        deadline: ``time.monotonic()`` value at which the watchdog kills the task.
        log: a logger whose records reach the server log.
        context: the parent session's context (user, company, language...), read-only:
            what the client passed to ``connect(context=...)``, or the web bridge's
            ``Access.context``.
        report_progress: where :meth:`set_progress` sends (the worker's pipe).
    """

    parameters: Mapping[str, str]
    db: Database
    task_id: int
    session_id: int
    record_id: str
    codeunit_id: int
    deadline: float
    log: logging.Logger
    context: Mapping[str, str]
    report_progress: Callable[[dict[str, str]], None] = lambda progress: None

    def remaining(self) -> float:
        """Seconds left before the watchdog kills this task."""
        return self.deadline - time.monotonic()

    def set_progress(self, progress: Mapping[str, str]) -> None:
        """Tell the page how far the task has got (``{"done": "3", "of": "10"}``).

        The page sees the latest value, at most once per ``ProgressInterval``; values set
        in quick succession are dropped (at most one leaves the worker per 10 ms). Never
        after the task's outcome.

        Raises:
            TypeError: not a mapping of text to text.
            ValueError: more than 4 KB.
        """
        copy = dict(progress)
        for key, value in copy.items():
            if type(key) is not str or type(value) is not str:
                raise TypeError(f"progress {key!r:.60}: {type(value).__name__} is not str -> str")
        self.report_progress(copy)


@dataclass(frozen=True, slots=True)
class Sharing:
    """How the tasks of a ``shared`` codeunit share executions (and results).

    Attributes:
        per_context: the session's context is part of what makes two tasks identical (the
            codeunit reads ``ctx.context``); otherwise the execution sees an empty context.
        cache: a completed result serves later identical tasks while the data version
            has not changed.
        max_age: seconds a cached result serves at most, on top; None: no limit.
    """

    per_context: bool = False
    cache: bool = False
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class Codeunit:
    id: int
    name: str
    function: CodeunitFunction
    sharing: Sharing | None = None  # None: every task runs on its own

    @property
    def qualname(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


_CODEUNITS: dict[int, Codeunit] = {}


def codeunit(
    codeunit_id: int,
    *,
    name: str | None = None,
    shared: bool = False,
    per_context: bool = False,
    cache: bool = False,
    max_age: float | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as codeunit ``codeunit_id``.

    The function takes the child session (``ctx``) and returns a ``dict[str, str]`` or None.

    Args:
        shared: its result depends only on its parameters and the data: identical tasks
            (same parameters) from any session attach to one execution while it waits or
            runs, and each gets the same outcome.
        per_context: with ``shared``: the session's context is part of what makes tasks
            identical (for a codeunit that reads ``ctx.context``).
        cache: with ``shared``: keep a completed result and serve it to later identical
            tasks, without running anything, while the database has not changed.
        max_age: with ``cache``: seconds a result serves at most, however still the data.

    Raises:
        ValueError: the id is not a positive int, another function already has it, or the
            sharing options contradict each other.
    """
    if type(codeunit_id) is not int or codeunit_id <= 0:
        raise ValueError(f"codeunit id must be a positive int, got {codeunit_id!r}")
    if (per_context or cache) and not shared:
        raise ValueError(f"codeunit {codeunit_id}: per_context and cache need shared=True")
    if max_age is not None and (not cache or not max_age > 0):
        raise ValueError(f"codeunit {codeunit_id}: max_age needs cache=True and a positive value")
    sharing = Sharing(per_context, cache, max_age) if shared else None

    def register(function: F) -> F:
        entry = Codeunit(codeunit_id, name or function.__name__, function, sharing)
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
        ImportError: a module cannot be imported, or ended the process at import (the
            message names it and says why).
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except SystemExit as err:  # sys.exit() at import would end the server without a word
            raise ImportError(
                f"codeunit module {module!r} called sys.exit({err.code!r}) while being imported"
            ) from err
        except ModuleNotFoundError as err:
            hint = ""
            if module.startswith("workers.") and err.name == module:
                hint = (
                    "; pbt-server's own package is named 'workers', so a package of yours"
                    " with that name is hidden by it: rename yours"
                )
            raise ImportError(f"cannot import codeunit module {module!r}: {err}{hint}") from err
        except Exception as err:
            raise ImportError(f"cannot import codeunit module {module!r}: {err}") from err
    return registered()


# --- reloading: new code in a fresh process ------------------------------------------------

_OWN_PACKAGES: Final = frozenset({"pbt_server", "workers"})


def application_packages(modules: Iterable[str]) -> tuple[str, ...]:
    """The module prefixes a reload imports afresh for ``[Codeunits] Modules``: the whole
    top-level package of each (``myapp`` for ``myapp.codeunits``, so the helpers it imports
    reload too), but only the named module itself inside pbt-server's own packages
    (``workers.demo``). Third-party packages they import are kept as they are."""
    prefixes: set[str] = set()
    for module in modules:
        top = module.partition(".")[0]
        prefixes.add(module if top in _OWN_PACKAGES else top)
    return tuple(sorted(prefixes))


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def reimport(modules: Iterable[str], prefixes: Iterable[str]) -> Mapping[int, Codeunit]:
    """Forget the modules under ``prefixes`` and the codeunits they registered, then import
    ``modules`` again (their files as they are now): in a reload's trial process, then in
    the broker (which runs no codeunit; its workers are forked after).

    Raises:
        ImportError: as :func:`load_modules`.
    """
    prefixes = tuple(prefixes)
    for name in [n for n in sys.modules if _under(n, prefixes)]:
        del sys.modules[name]
    for codeunit_id, entry in list(_CODEUNITS.items()):
        if _under(entry.function.__module__, prefixes):
            del _CODEUNITS[codeunit_id]
    importlib.invalidate_caches()
    return load_modules(modules)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The modules under some prefixes and the registry, as they were (to undo a reimport)."""

    prefixes: tuple[str, ...]
    modules: Mapping[str, object]
    codeunits: Mapping[int, Codeunit]


def snapshot(prefixes: Iterable[str]) -> Snapshot:
    prefixes = tuple(prefixes)
    modules = {n: m for n, m in sys.modules.items() if _under(n, prefixes)}
    return Snapshot(prefixes, modules, registered())


def restore(saved: Snapshot) -> None:
    """Put back what :func:`reimport` replaced since ``saved`` was taken."""
    for name in [n for n in sys.modules if _under(n, saved.prefixes)]:
        del sys.modules[name]
    sys.modules.update(saved.modules)  # type: ignore[arg-type]
    _CODEUNITS.clear()
    _CODEUNITS.update(saved.codeunits)


def module_files(prefixes: Iterable[str]) -> list[str]:
    """The source files of the imported modules under ``prefixes`` (what ``--reload``
    watches)."""
    prefixes = tuple(prefixes)
    files = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and _under(name, prefixes):
            files.append(path)
    return sorted(files)
