"""``server.ini``: one frozen dataclass per section, read once at start.

Every key is declared once, on its dataclass field, with :func:`key`: its ini name (Business
Central's spelling), its default (as ini text, so the defaults pass the same checks as the
file), its converter and its comment. The reader, the shipped ``config/server.ini``
(:func:`render_ini`) and the README's table (:func:`render_markdown`) all come from those
declarations; tests keep the shipped file and the README equal to what they render.

A converter is a small pure function ``str -> value`` that raises ``ValueError`` with a
reason; the reader turns that into a :class:`ConfigError` reading
``{file}: [Section] Key = 'value': reason`` (the ``PBT_*`` variable replaces the file for an
environment override; a secret's value is never shown).

Relative paths resolve against ``base_dir`` (the directory the command runs in) here, at load,
so a daemon that later changes directory still finds its socket, pid file, log and database.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import importlib.util
import keyword
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import unquote

from pbt_server.errors import ConfigError
from pbt_server.protocol import DEFAULT_MAX_FRAME

__all__ = [
    "AsyncProcessingSection",
    "CodeunitsSection",
    "DatabaseSection",
    "DatabaseUrl",
    "ServerConfig",
    "ServerSection",
    "WebSection",
    "WorkersSection",
    "load_config",
    "render_ini",
    "render_markdown",
]

T = TypeVar("T")

_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes on Linux, one of them the closing NUL
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NO_FILE: Final = "<defaults>"
_KEY: Final = "pbt_key"


# --- converters: text in, value out, ValueError(reason) on bad input ----------------------


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        # int() would also take "1_000" and non-ASCII digits; an ini file should not.
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError("not an integer")
        value = int(text)
        if hi is None and value < lo:
            raise ValueError(f"must be at least {lo}")
        if hi is not None and not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return convert


_TIMESPAN: Final = re.compile(
    r"(?:(?P<d>[0-9]+)\.)?(?P<h>[0-9]{1,2}):(?P<m>[0-9]{1,2}):(?P<s>[0-9]{1,2})"
    r"(?:\.(?P<f>[0-9]{1,7}))?"
)


def _span(text: str) -> int:
    """Milliseconds in a BC timespan ``[d.]hh:mm:ss[.fffffff]`` (zero allowed)."""
    match = _TIMESPAN.fullmatch(text)
    if match is None:
        raise ValueError("not a timespan; expected [d.]hh:mm:ss[.fff], e.g. 00:02:00")
    days, hours, minutes, seconds = (int(match[part] or 0) for part in "dhms")
    if hours > 23:
        raise ValueError("hours must be 0-23; write longer spans as d.hh:mm:ss")
    if minutes > 59 or seconds > 59:
        raise ValueError("minutes and seconds must be 0-59")
    # BC counts 100 ns ticks; our clocks work in milliseconds, so finer digits are dropped.
    millis = int((match["f"] or "").ljust(3, "0")[:3])
    return (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000 + millis


def _timespan(text: str) -> int:
    """Milliseconds in a timespan that must be longer than zero."""
    total = _span(text)
    if total <= 0:
        raise ValueError("must be longer than zero")
    return total


def _path(text: str, base: Path) -> Path:
    if not text:
        raise ValueError("must not be empty")
    return Path(os.path.normpath(base / text))


def _socket_path(text: str, base: Path) -> Path:
    path = _path(text, base)
    size = len(os.fsencode(path))
    if size > _UNIX_PATH_MAX:
        raise ValueError(
            f"resolves to {path} ({size} bytes), longer than the {_UNIX_PATH_MAX} bytes"
            " a Unix socket path may have; choose a shorter path"
        )
    return path


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:7085`` for IPv6) as a pair.

    Raises:
        ValueError: not host:port, or the port is not 1-65535.
    """
    address = _tcp_address(text)
    if address is None:
        raise ValueError("expected host:port")
    return address


def _tcp_address(text: str) -> tuple[str, int] | None:
    if not text:
        return None
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("expected host:port, e.g. 127.0.0.1:7085")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:7085")
    if not host:
        raise ValueError("name the host, e.g. 127.0.0.1:7085 (0.0.0.0 for every interface)")
    # Port 0 lets the OS pick a free port, which tests rely on.
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, not '{port}'")
    return host, int(port)


def _auth_token(text: str) -> str:
    if text and len(text) < 16:
        raise ValueError("must be at least 16 characters (empty = no token)")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.lower()

    return convert


_EVENT_LOOPS: Final = ("auto", "asyncio", "uvloop")


def _event_loop(text: str) -> str:
    choice = text.lower()
    if choice not in _EVENT_LOOPS:
        raise ValueError(f"must be one of {', '.join(_EVENT_LOOPS)}")
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed: pip install 'pbt-server[fast]' (or say auto)")
    return choice


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """``[Database] Url``, parsed once: the backend, and the SQLite file's absolute path."""

    text: str
    """The URL: ``sqlite:///<absolute path>`` for SQLite, as given for PostgreSQL."""
    backend: str
    """``"sqlite"`` or ``"postgresql"``."""
    path: Path | None = None
    """The SQLite file (percent-escapes decoded), or None."""

    def __str__(self) -> str:
        return self.text


def _database_url(text: str, base: Path) -> DatabaseUrl:
    scheme, slashes, rest = text.partition("://")
    scheme = scheme.lower()
    if slashes and scheme in ("postgresql", "postgres"):
        if not rest:
            raise ValueError("names no server or database")
        return DatabaseUrl(text, "postgresql")
    if slashes and scheme == "sqlite":
        if not rest.startswith("/"):
            raise ValueError("write sqlite:///relative/path or sqlite:////absolute/path")
        file = unquote(rest[1:])  # a URL: sqlite:///my%20db.sqlite names "my db.sqlite"
        if file in ("", ":memory:"):
            # Each worker opens its own connection; they must all see the same file.
            raise ValueError("name a database file; workers cannot share an in-memory one")
        path = _path(file, base)
        return DatabaseUrl(f"sqlite:///{path}", "sqlite", path)
    raise ValueError("expected sqlite:///path or postgresql://...")


_ISOLATIONS: Final = ("RepeatableRead", "ReadCommitted", "Serializable")


def _isolation(text: str) -> str:
    for name in _ISOLATIONS:
        if text.lower() == name.lower():
            return name
    raise ValueError(f"must be one of {', '.join(_ISOLATIONS)}")


def _modules(text: str) -> tuple[str, ...]:
    names = tuple(name for name in re.split(r"[\s,]+", text) if name)
    if not names:
        raise ValueError("names no module; at least one is needed")
    for i, name in enumerate(names):
        parts = name.split(".")
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
            raise ValueError(f"'{name}' is not a dotted module name")
        if name in names[:i]:
            raise ValueError(f"lists '{name}' twice")
    return names


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(item.rstrip("/").lower() for item in re.split(r"[\s,]+", text) if item)
    for origin in origins:
        # A browser's Origin header is scheme://host[:port], nothing more; "*" would let any
        # site's page run codeunits with the visitor's cookies.
        if not re.fullmatch(r"https?://[^/\s?#@]+", origin):
            raise ValueError(f"'{origin}' is not an origin like https://app.example.com")
    return origins


def _codeunit_ids(text: str) -> frozenset[int]:
    ids: set[int] = set()
    for item in re.split(r"[\s,]+", text):
        if not item:
            continue
        if not re.fullmatch(r"[0-9]{1,18}", item):
            raise ValueError(f"'{item}' is not a codeunit id")
        ids.add(int(item))
    return frozenset(ids)


# --- declaring a key ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """One ``server.ini`` key: its spelling, default text, converter and comment."""

    name: str
    default: str
    convert: Callable[[str], Any] | None
    relative: Callable[[str, Path], Any] | None  # converters of paths take the base dir
    doc: str
    secret: bool = False
    restart: bool = False  # a reload cannot apply it: the running server keeps its value

    def parse(self, text: str, base: Path) -> Any:
        if self.relative is not None:
            return self.relative(text, base)
        assert self.convert is not None
        return self.convert(text)


def key(
    name: str,
    default: str,
    convert: Callable[[str], Any],
    doc: str,
    *,
    secret: bool = False,
    restart: bool = False,
) -> Any:
    """Declare a dataclass field as the ini key ``name``; ``restart``: a reload cannot
    apply a new value (the running server keeps its own and says so)."""
    spec = Key(name, default, convert, None, doc, secret, restart)
    return field(metadata={_KEY: spec}, repr=not secret)


def path_key(
    name: str,
    default: str,
    convert: Callable[[str, Path], Any],
    doc: str,
    *,
    restart: bool = False,
) -> Any:
    """Declare a key whose value resolves against the base directory."""
    return field(metadata={_KEY: Key(name, default, None, convert, doc, restart=restart)})


def keys(section: type) -> list[tuple[str, Key]]:
    """The declared keys of a section class, as (field name, key), in declaration order."""
    return [(f.name, f.metadata[_KEY]) for f in dataclasses.fields(section) if _KEY in f.metadata]


# --- reading one section ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Value:
    key: str  # as the user spelled it
    text: str
    origin: str  # the file or the PBT_* variable it came from


class _SectionReader:
    """The raw values of one section; hands each out once, so leftovers are unknown keys."""

    def __init__(self, section: str, given: Mapping[str, _Value], origin: str, base: Path) -> None:
        self.section = section
        self.base_dir = base
        self._given = dict(given)  # lower-cased key -> value
        self._origin = origin  # for keys left at their default
        self._used: dict[str, tuple[_Value, Key]] = {}

    def get(self, spec: Key) -> Any:
        value = self._given.pop(spec.name.lower(), None) or _Value(
            spec.name, spec.default, self._origin
        )
        self._used[spec.name] = (value, spec)
        try:
            return spec.parse(value.text, self.base_dir)
        except ValueError as err:
            raise self.error(spec.name, str(err)) from err

    def text(self, key: str) -> str:
        return self._used[key][0].text

    def error(self, key: str, reason: str) -> ConfigError:
        value, spec = self._used[key]
        shown = "***" if spec.secret and value.text else value.text
        return ConfigError(f"{value.origin}: [{self.section}] {key} = '{shown}': {reason}")

    def finish(self) -> None:
        for value in self._given.values():
            # No value shown: a misspelt secret (AuthTokn = ...) must not reach a log.
            raise ConfigError(
                f"{value.origin}: [{self.section}] {value.key}:"
                f" unknown key (known: {', '.join(self._used)})"
            )


class Section:
    """Base of the section dataclasses: ``SECTION`` names it; ``check`` holds the checks
    that involve more than one key."""

    __slots__ = ()
    SECTION: ClassVar[str]

    def check(self, r: _SectionReader) -> None:
        """Raise ``r.error(key, reason)`` if keys contradict each other."""


S = TypeVar("S", bound=Section)


def _read_section(cls: type[S], r: _SectionReader) -> S:
    section = cls(**{name: r.get(spec) for name, spec in keys(cls)})
    section.check(r)
    r.finish()
    return section


# --- the sections -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSection(Section):
    """``[Server]``: where the broker listens and writes."""

    SECTION: ClassVar[str] = "Server"

    socket_path: Path = path_key(
        "SocketPath",
        "var/pbt.sock",
        _socket_path,
        "Unix socket clients connect to (mode 0600)",
        restart=True,
    )
    tcp_address: tuple[str, int] | None = key(
        "TcpAddress",
        "",
        _tcp_address,
        "also listen on TCP, as host:port ([::1]:7085 for IPv6); empty = off; needs AuthToken",
        restart=True,
    )
    auth_token: str = key(
        "AuthToken",
        "",
        _auth_token,
        "secret every TCP client must present, at least 16 characters; empty = none",
        secret=True,
    )
    pid_file: Path = path_key(
        "PidFile",
        "var/pbt-server.pid",
        _path,
        "pid file, locked while the server runs",
        restart=True,
    )
    log_file: Path = path_key(
        "LogFile",
        "var/pbt-server.log",
        _path,
        "log file of the server and its workers",
        restart=True,
    )
    log_level: str = key("LogLevel", "INFO", _log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: str = key(
        "LogFormat",
        "text",
        _choice("text", "json"),
        "text, or json: one object per line with event ids and task fields (Loki, Elastic)",
    )
    max_frame_bytes: int = key(
        "MaxFrameBytes",
        str(DEFAULT_MAX_FRAME),
        _int_in(1024, 1 << 26),
        "largest client frame and largest task result, in bytes (1024 to 67108864)",
        restart=True,
    )
    max_connections: int = key(
        "MaxConnections",
        "4096",
        _int_in(1, 1 << 20),
        "sessions at most (connections that said hello); one more is refused with ServerBusy",
    )
    max_buffered_mb: int = key(
        "MaxBufferedMB",
        "256",
        _int_in(1),
        "memory budget for partly received frames and the parameters of waiting tasks, in"
        " MB; over it, new work is refused (ServerMemoryBudget)",
    )
    metrics_address: tuple[str, int] | None = key(
        "MetricsAddress",
        "",
        _tcp_address,
        "serve Prometheus metrics (/metrics), a health check (/health) and the live dashboard"
        " (/) over HTTP on host:port; empty = off; needs pbt-server[metrics]; no"
        " authentication, so bind it to an internal address",
        restart=True,
    )
    event_loop: str = key(
        "EventLoop",
        "auto",
        _event_loop,
        "the broker's event loop: uvloop (the fast extra: pip install 'pbt-server[fast]'),"
        " asyncio, or auto: uvloop if installed",
        restart=True,
    )

    def check(self, r: _SectionReader) -> None:
        if self.tcp_address is not None and not self.auth_token:
            # Anyone who can reach the port could otherwise run codeunits.
            raise r.error("TcpAddress", "TCP needs an AuthToken")


@dataclass(frozen=True, slots=True)
class AsyncProcessingSection(Section):
    """``[AsynchronousProcessing]``: Business Central's per-session limits and timeouts."""

    SECTION: ClassVar[str] = "AsynchronousProcessing"

    max_concurrency: int = key(
        "ChildSessionsMaxConcurrency",
        "5",
        _int_in(1),
        "tasks of one session running at once; the rest wait in FIFO order",
    )
    # At least 1: every task waits in the queue, if only until a worker takes it.
    max_queue_length: int = key(
        "ChildSessionsMaxQueueLength",
        "100",
        _int_in(1),
        "tasks of one session waiting; enqueueing one more fails with ChildSessionQueueFull",
    )
    default_timeout_ms: int = key(
        "PageBackgroundTaskDefaultTimeout",
        "00:02:00",
        _timespan,
        "timeout of a task enqueued without one (or with one <= 0)",
    )
    max_timeout_ms: int = key(
        "PageBackgroundTaskMaxTimeout",
        "00:10:00",
        _timespan,
        "longest timeout a task may have; larger timeouts are clamped to this",
    )
    progress_interval_ms: int = key(
        "ProgressInterval",
        "00:00:00.100",
        _timespan,
        "a task's progress (ctx.set_progress) reaches its page at most once per this; values"
        " set in between are dropped, the latest is kept",
    )

    def check(self, r: _SectionReader) -> None:
        if self.default_timeout_ms > self.max_timeout_ms:
            # Clamping would silently shorten every task enqueued without a timeout.
            raise r.error(
                "PageBackgroundTaskDefaultTimeout",
                "must not exceed PageBackgroundTaskMaxTimeout"
                f" ({r.text('PageBackgroundTaskMaxTimeout')})",
            )


@dataclass(frozen=True, slots=True)
class WorkersSection(Section):
    """``[Workers]``: the pool of pre-started child-session processes."""

    SECTION: ClassVar[str] = "Workers"

    count: int = key(
        "Count",
        "5",
        _int_in(1, 256),
        "pre-started worker processes shared by all sessions; 5 lets one session run its"
        " ChildSessionsMaxConcurrency (5) at once",
    )
    max_tasks_per_worker: int = key(
        "MaxTasksPerWorker", "0", _int_in(0), "recycle a worker after this many tasks; 0 = never"
    )
    max_memory_mb: int = key(
        "MaxMemoryMB", "0", _int_in(0), "kill a worker whose RSS exceeds this many MB; 0 = off"
    )
    result_cache_mb: int = key(
        "ResultCacheMB",
        "64",
        _int_in(0),
        "memory for the results of cache=True codeunits, in MB (least recently used go"
        " first); 0 = no cache",
    )
    cancel_grace_ms: int = key(
        "CancelGrace",
        "00:00:00.050",
        _span,
        "a cancelled running task frees its session's slot and a worker at once; its own"
        " worker is killed only if the task has not ended within this (then it is reused);"
        " 00:00:00 = kill at once",
    )
    ack_timeout_ms: int = key(
        "AckTimeout",
        "00:00:05",
        _timespan,
        "a worker that has not taken a task it was handed off its pipe within this is killed"
        " (the task runs elsewhere, once)",
    )


@dataclass(frozen=True, slots=True)
class DatabaseSection(Section):
    """``[Database]``: what codeunits read (workers open it read-only)."""

    SECTION: ClassVar[str] = "Database"

    url: DatabaseUrl = path_key(
        "Url",
        "sqlite:///var/demo.db",
        _database_url,
        "sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host/dbname",
    )
    isolation: str = key(
        "Isolation",
        "RepeatableRead",
        _isolation,
        "PostgreSQL: each task reads one snapshot (RepeatableRead), or ReadCommitted, or"
        " Serializable (READ ONLY DEFERRABLE; not on a hot standby); SQLite: one snapshot per"
        " task in WAL mode, per statement otherwise",
    )
    statement_timeout_ms: int = key(
        "StatementTimeout",
        "00:00:00",
        _span,
        "longest a single statement may run (DB:Timeout); 00:00:00 = no limit",
    )


@dataclass(frozen=True, slots=True)
class CodeunitsSection(Section):
    """``[Codeunits]``: where the ``@codeunit`` functions live."""

    SECTION: ClassVar[str] = "Codeunits"

    modules: tuple[str, ...] = key(
        "Modules",
        "workers.demo",
        _modules,
        "modules whose @codeunit functions are registered (comma- or space-separated)",
    )


@dataclass(frozen=True, slots=True)
class WebSection(Section):
    """``[Web]``: the browser bridge (``pbt-server web``, ``pbt_server.web.create_app``)."""

    SECTION: ClassVar[str] = "Web"

    reconnect_grace_ms: int = key(
        "ReconnectGrace",
        "00:00:10",
        _timespan,
        "how long a browser tab's session outlives its dropped WebSocket (a network blip)",
        restart=True,
    )
    allowed_origins: tuple[str, ...] = key(
        "AllowedOrigins",
        "",
        _origins,
        "origins whose pages may connect (https://app.example.com, ...); empty = the"
        " request's own host",
        restart=True,
    )
    allowed_codeunits: frozenset[int] = key(
        "AllowedCodeunits",
        "",
        _codeunit_ids,
        "codeunit ids a browser may enqueue when the app gives no authorize hook; empty = none",
        restart=True,
    )
    max_message_bytes: int = key(
        "MaxMessageBytes",
        "65536",
        _int_in(1024, 1 << 26),
        "the largest WebSocket message a browser may send, in bytes",
        restart=True,
    )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole of ``server.ini`` after environment overrides."""

    server: ServerSection
    asynchronous_processing: AsyncProcessingSection
    workers: WorkersSection
    database: DatabaseSection
    codeunits: CodeunitsSection
    web: WebSection
    source: Path | None
    """The file it was read from (absolute), or None for built-in defaults."""
    base_dir: Path | None = None
    """The directory relative paths resolved against (a reload reads the file again there)."""


SECTIONS: Final[tuple[type[Section], ...]] = (
    ServerSection,
    AsyncProcessingSection,
    WorkersSection,
    DatabaseSection,
    CodeunitsSection,
    WebSection,
)
_Given = dict[str, dict[str, _Value]]  # section -> lower-cased key -> value


def load_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> ServerConfig:
    """Read ``path`` (None = defaults only), apply ``PBT_<SECTION>_<KEY>`` overrides, check.

    ``environ`` defaults to ``os.environ``; relative paths in the file resolve against
    ``base_dir`` (default: the current directory). Raises :class:`ConfigError`.
    """
    env = os.environ if environ is None else environ
    base = Path(os.path.abspath(Path.cwd() if base_dir is None else base_dir))
    given: _Given = {cls.SECTION: {} for cls in SECTIONS}
    if path is not None:
        _read_file(Path(path), given)
    _read_environ(env, given)
    origin = _NO_FILE if path is None else str(path)

    def read(cls: type[S]) -> S:
        return _read_section(cls, _SectionReader(cls.SECTION, given[cls.SECTION], origin, base))

    return ServerConfig(
        server=read(ServerSection),
        asynchronous_processing=read(AsyncProcessingSection),
        workers=read(WorkersSection),
        database=read(DatabaseSection),
        codeunits=read(CodeunitsSection),
        web=read(WebSection),
        source=None if path is None else Path(os.path.abspath(path)),
        base_dir=base,
    )


def reloaded(running: ServerConfig, new: ServerConfig) -> tuple[ServerConfig, list[str]]:
    """What a reload applies: ``new``, except the keys declared ``restart``, which keep their
    running values. Returns that config and the keys that changed but wait for a restart,
    as ``[Section] Key`` (the ``[Web]`` keys are the web app's, read when it starts)."""
    waiting: list[str] = []
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        old_section, new_section = getattr(running, f.name), getattr(new, f.name)
        if not isinstance(old_section, Section):
            continue
        kept = {}
        for name, spec in keys(type(old_section)):
            if spec.restart and getattr(old_section, name) != getattr(new_section, name):
                kept[name] = getattr(old_section, name)
                waiting.append(f"[{old_section.SECTION}] {spec.name}")
        sections[f.name] = dataclasses.replace(new_section, **kept) if kept else new_section
    server = sections["server"]
    assert isinstance(server, ServerSection)
    if server.tcp_address is not None and not server.auth_token:
        # TCP stays open until the restart: it must not stay open without a token.
        sections["server"] = dataclasses.replace(server, auth_token=running.server.auth_token)
        waiting.append("[Server] AuthToken (empty, while TCP listens until the restart)")
    return dataclasses.replace(new, **sections), waiting


class _CaseKeepingParser(configparser.ConfigParser):
    # Keep the user's spelling for messages; load_config matches keys case-insensitively.
    def optionxform(self, optionstr: str) -> str:
        return optionstr


def _read_file(path: Path, given: _Given) -> None:
    parser = _CaseKeepingParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err.reason}") from err
    except configparser.DuplicateSectionError as err:
        raise ConfigError(f"{path}: [{err.section}]: section given twice") from err
    except configparser.DuplicateOptionError as err:
        raise ConfigError(f"{path}: [{err.section}] {err.option}: key given twice") from err
    except configparser.MissingSectionHeaderError as err:
        raise ConfigError(f"{path}: line {err.lineno}: key before any [Section]") from err
    except configparser.ParsingError as err:
        lineno, line = err.errors[0]
        if len(line) > 1 and line[0] == line[-1] == "'":  # before 3.13, the line is a repr
            line = ast.literal_eval(line)
        raise ConfigError(f"{path}: line {lineno}: not 'Key = value': {line.strip()}") from err
    except configparser.Error as err:
        raise ConfigError(f"{path}: not an ini file: {err.message}") from err

    known = {name.lower(): name for name in given}
    if parser.defaults():  # [DEFAULT] would leak its keys into every section
        raise ConfigError(f"{path}: [{parser.default_section}]: unknown section")
    seen: set[str] = set()
    for spelled in parser.sections():
        section = known.get(spelled.lower())
        if section is None:
            raise ConfigError(f"{path}: [{spelled}]: unknown section (known: {', '.join(given)})")
        if section in seen:
            raise ConfigError(f"{path}: [{spelled}]: section given twice")
        seen.add(section)
        for key_name, text in parser.items(spelled, raw=True):
            if key_name.lower() in given[section]:
                raise ConfigError(f"{path}: [{section}] {key_name}: key given twice")
            given[section][key_name.lower()] = _Value(key_name, text, str(path))


def _read_environ(environ: Mapping[str, str], given: _Given) -> None:
    sections = {name.upper(): name for name in given}
    for variable, text in environ.items():
        prefix, _, rest = variable.partition("_")
        section_part, _, key_name = rest.partition("_")
        section = sections.get(section_part.upper())
        # Other PBT_* variables (PBT_SOCKET is the client's) are not ours to judge.
        if prefix != "PBT" or section is None:
            continue
        given[section][key_name.lower()] = _Value(key_name, text.strip(), variable)


# --- what the declarations render: the shipped file, the README table ---------------------

INI_HEADER: Final = """\
; pbt-server configuration. Every key is listed here with its default value.
;
; Relative paths (SocketPath, PidFile, LogFile, a sqlite Url) resolve against the directory
; the pbt-server command runs in, once at start (before daemonizing), so the README's
; commands work from the repository root.
; Environment variables PBT_<SECTION>_<KEY> override this file, e.g. PBT_WORKERS_COUNT=8 or
; PBT_ASYNCHRONOUSPROCESSING_CHILDSESSIONSMAXCONCURRENCY=2.
; Timespans are [d.]hh:mm:ss[.fff], as in Business Central.
;
; This file is rendered from the declarations in pbt_server/config.py
; (python -m pbt_server.config ini); a test keeps the two equal.
"""


def render_ini(sections: tuple[type[Section], ...] = SECTIONS) -> str:
    """The shipped ``server.ini``: every key with its default, a comment above each."""
    parts = [INI_HEADER]
    for cls in sections:
        parts.append(f"\n[{cls.SECTION}]\n")
        for _, spec in keys(cls):
            for line in textwrap.wrap(spec.doc, 94):
                parts.append(f"; {line}\n")
            parts.append(f"{spec.name} = {spec.default}".rstrip() + "\n")
    return "".join(parts)


def render_markdown(sections: tuple[type[Section], ...] = SECTIONS) -> str:
    """The README's table of every key."""
    rows = ["| section | key | default | reload | meaning |", "|---|---|---|---|---|"]
    for cls in sections:
        first = True
        for _, spec in keys(cls):
            default = f"`{spec.default}`" if spec.default else "(empty)"
            doc = spec.doc.replace("|", "\\|")
            applies = "restart" if spec.restart else "yes"
            section = cls.SECTION if first else ""
            rows.append(f"| {section} | {spec.name} | {default} | {applies} | {doc} |")
            first = False
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m pbt_server.config ini|markdown
    import sys

    print((render_markdown if sys.argv[1:] == ["markdown"] else render_ini)(), end="")
