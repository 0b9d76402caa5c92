"""``server.ini``: one frozen dataclass per section, read once at start.

Each section class parses itself in ``_from_ini``, which names every key in Business Central's
spelling, its default (as ini text, so the defaults pass the same checks as the file) and its
converter. A converter is a small pure function ``str -> value`` that raises ``ValueError``
with a reason; the reader turns that into a :class:`ConfigError` reading
``{file}: [Section] Key = 'value': reason`` (the ``PBT_*`` variable replaces the file for an
environment override).

Relative paths resolve against ``base_dir`` (the directory the command runs in) here, at load,
so a daemon that later changes directory still finds its socket, pid file, log and database.
"""

from __future__ import annotations

import configparser
import keyword
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Protocol, Self, TypeVar

from pbt_server.errors import ConfigError
from pbt_server.protocol import DEFAULT_MAX_FRAME

__all__ = [
    "AsyncSection",
    "CodeunitsSection",
    "DatabaseSection",
    "ServerConfig",
    "ServerSection",
    "WebSection",
    "WorkersSection",
    "load_config",
]

T = TypeVar("T")

_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes on Linux, one of them the closing NUL
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_NO_FILE: Final = "<defaults>"


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


def _timespan(text: str) -> int:
    """Milliseconds in a BC timespan ``[d.]hh:mm:ss[.fffffff]``."""
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
    total = (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000 + millis
    if total <= 0:
        raise ValueError("must be longer than zero")
    return total


def _path(base: Path) -> Callable[[str], Path]:
    def convert(text: str) -> Path:
        if not text:
            raise ValueError("must not be empty")
        return Path(os.path.normpath(base / text))

    return convert


def _socket_path(base: Path) -> Callable[[str], Path]:
    def convert(text: str) -> Path:
        path = _path(base)(text)
        size = len(os.fsencode(path))
        if size > _UNIX_PATH_MAX:
            raise ValueError(
                f"resolves to {path} ({size} bytes), longer than the {_UNIX_PATH_MAX} bytes"
                " a Unix socket path may have; choose a shorter path"
            )
        return path

    return convert


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


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


def _database_url(base: Path) -> Callable[[str], str]:
    def convert(text: str) -> str:
        scheme, slashes, rest = text.partition("://")
        scheme = scheme.lower()
        if slashes and scheme in ("postgresql", "postgres"):
            if not rest:
                raise ValueError("names no server or database")
            return text
        if slashes and scheme == "sqlite":
            if not rest.startswith("/"):
                raise ValueError("write sqlite:///relative/path or sqlite:////absolute/path")
            file = rest[1:]
            if file in ("", ":memory:"):
                # Each worker opens its own connection; they must all see the same file.
                raise ValueError("name a database file; workers cannot share an in-memory one")
            return "sqlite:///" + str(_path(base)(file))
        raise ValueError("expected sqlite:///path or postgresql://...")

    return convert


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
        self._used: dict[str, _Value] = {}

    def get(self, key: str, default: str, convert: Callable[[str], T]) -> T:
        value = self._given.pop(key.lower(), None) or _Value(key, default, self._origin)
        self._used[key] = value
        try:
            return convert(value.text)
        except ValueError as err:
            raise self.error(key, str(err)) from err

    def text(self, key: str) -> str:
        return self._used[key].text

    def error(self, key: str, reason: str) -> ConfigError:
        value = self._used[key]
        return ConfigError(f"{value.origin}: [{self.section}] {key} = '{value.text}': {reason}")

    def finish(self) -> None:
        for value in self._given.values():
            raise ConfigError(
                f"{value.origin}: [{self.section}] {value.key} = '{value.text}':"
                f" unknown key (known: {', '.join(self._used)})"
            )


class _Section(Protocol):
    SECTION: ClassVar[str]

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self: ...


_S = TypeVar("_S", bound=_Section)


# --- the sections -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSection:
    """``[Server]``: where the broker listens and writes."""

    SECTION: ClassVar[str] = "Server"

    socket_path: Path
    """SocketPath: the Unix socket (mode 0600), absolute."""
    tcp_address: tuple[str, int] | None
    """TcpAddress: ``(host, port)`` to also listen on, or None; needs an AuthToken."""
    auth_token: str = field(repr=False)  # keep the secret out of logged configs
    """AuthToken: the secret clients present in ``hello``; empty = none."""
    pid_file: Path
    """PidFile: written by ``pbt-server start``, absolute."""
    log_file: Path
    """LogFile: the daemon's log, absolute."""
    log_level: str
    """LogLevel: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    max_frame_bytes: int
    """MaxFrameBytes: the largest client frame, and the largest task result."""
    max_connections: int
    """MaxConnections: open client connections at most; one more is refused."""

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        section = cls(
            socket_path=r.get("SocketPath", "var/pbt.sock", _socket_path(r.base_dir)),
            tcp_address=r.get("TcpAddress", "", _tcp_address),
            auth_token=r.get("AuthToken", "", _auth_token),
            pid_file=r.get("PidFile", "var/pbt-server.pid", _path(r.base_dir)),
            log_file=r.get("LogFile", "var/pbt-server.log", _path(r.base_dir)),
            log_level=r.get("LogLevel", "INFO", _log_level),
            max_frame_bytes=r.get("MaxFrameBytes", str(DEFAULT_MAX_FRAME), _int_in(1024, 1 << 26)),
            max_connections=r.get("MaxConnections", "4096", _int_in(1, 1 << 20)),
        )
        if section.tcp_address is not None and not section.auth_token:
            # Anyone who can reach the port could otherwise run codeunits.
            raise r.error("TcpAddress", "TCP needs an AuthToken")
        return section


@dataclass(frozen=True, slots=True)
class AsyncSection:
    """``[AsynchronousProcessing]``: BC's per-session limits and task timeouts."""

    SECTION: ClassVar[str] = "AsynchronousProcessing"

    max_concurrency: int
    """ChildSessionsMaxConcurrency: tasks of one session running at once."""
    max_queue_length: int
    """ChildSessionsMaxQueueLength: tasks of one session waiting; one more is refused."""
    default_timeout_ms: int
    """PageBackgroundTaskDefaultTimeout: for tasks enqueued without a timeout, in ms."""
    max_timeout_ms: int
    """PageBackgroundTaskMaxTimeout: larger timeouts are clamped to this, in ms."""

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        section = cls(
            max_concurrency=r.get("ChildSessionsMaxConcurrency", "5", _int_in(1)),
            # At least 1: every task waits in the queue, if only until a worker takes it.
            max_queue_length=r.get("ChildSessionsMaxQueueLength", "100", _int_in(1)),
            default_timeout_ms=r.get("PageBackgroundTaskDefaultTimeout", "00:02:00", _timespan),
            max_timeout_ms=r.get("PageBackgroundTaskMaxTimeout", "00:10:00", _timespan),
        )
        if section.default_timeout_ms > section.max_timeout_ms:
            # Clamping would silently shorten every task enqueued without a timeout.
            raise r.error(
                "PageBackgroundTaskDefaultTimeout",
                "must not exceed PageBackgroundTaskMaxTimeout"
                f" ({r.text('PageBackgroundTaskMaxTimeout')})",
            )
        return section


@dataclass(frozen=True, slots=True)
class WorkersSection:
    """``[Workers]``: the pool of pre-started child-session processes."""

    SECTION: ClassVar[str] = "Workers"

    count: int
    """Count: worker processes, shared by all sessions."""
    max_tasks_per_worker: int
    """MaxTasksPerWorker: replace a worker after this many tasks; 0 = never."""
    max_memory_mb: int
    """MaxMemoryMB: kill a worker whose RSS exceeds this; 0 = no limit."""

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        return cls(
            count=r.get("Count", "4", _int_in(1, 256)),
            max_tasks_per_worker=r.get("MaxTasksPerWorker", "0", _int_in(0)),
            max_memory_mb=r.get("MaxMemoryMB", "0", _int_in(0)),
        )


@dataclass(frozen=True, slots=True)
class DatabaseSection:
    """``[Database]``: what codeunits read (workers open it read-only)."""

    SECTION: ClassVar[str] = "Database"

    url: str
    """Url: ``sqlite:////absolute/path`` or ``postgresql://...``."""

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None for a PostgreSQL URL."""
        prefix = "sqlite:///"
        return Path(self.url[len(prefix) :]) if self.url.startswith(prefix) else None

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        return cls(url=r.get("Url", "sqlite:///var/demo.db", _database_url(r.base_dir)))


@dataclass(frozen=True, slots=True)
class CodeunitsSection:
    """``[Codeunits]``: where the ``@codeunit`` functions live."""

    SECTION: ClassVar[str] = "Codeunits"

    modules: tuple[str, ...]
    """Modules: dotted module names imported at start, each registering its codeunits."""

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        return cls(modules=r.get("Modules", "workers.demo", _modules))


@dataclass(frozen=True, slots=True)
class WebSection:
    """``[Web]``: the browser bridge (``pbt-server web``, ``pbt_server.web.create_app``)."""

    SECTION: ClassVar[str] = "Web"

    reconnect_grace_ms: int
    """ReconnectGrace: how long a tab's session outlives its dropped WebSocket, in ms."""
    allowed_origins: tuple[str, ...]
    """AllowedOrigins: origins whose pages may connect; empty = the request's own host."""
    allowed_codeunits: frozenset[int]
    """AllowedCodeunits: what a browser may enqueue when the app gives no authorize hook."""
    max_message_bytes: int
    """MaxMessageBytes: the largest WebSocket message a browser may send."""

    @classmethod
    def _from_ini(cls, r: _SectionReader) -> Self:
        return cls(
            reconnect_grace_ms=r.get("ReconnectGrace", "00:00:10", _timespan),
            allowed_origins=r.get("AllowedOrigins", "", _origins),
            allowed_codeunits=r.get("AllowedCodeunits", "", _codeunit_ids),
            max_message_bytes=r.get("MaxMessageBytes", "65536", _int_in(1024, 1 << 26)),
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The whole of ``server.ini`` after environment overrides."""

    server: ServerSection
    asynchronous_processing: AsyncSection
    workers: WorkersSection
    database: DatabaseSection
    codeunits: CodeunitsSection
    web: WebSection
    source: Path | None
    """The file it was read from (absolute), or None for built-in defaults."""


_SECTIONS: Final[tuple[type[_Section], ...]] = (
    ServerSection,
    AsyncSection,
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
    given: _Given = {cls.SECTION: {} for cls in _SECTIONS}
    if path is not None:
        _read_file(Path(path), given)
    _read_environ(env, given)
    origin = _NO_FILE if path is None else str(path)

    def read(cls: type[_S]) -> _S:
        reader = _SectionReader(cls.SECTION, given[cls.SECTION], origin, base)
        section = cls._from_ini(reader)
        reader.finish()
        return section

    return ServerConfig(
        server=read(ServerSection),
        asynchronous_processing=read(AsyncSection),
        workers=read(WorkersSection),
        database=read(DatabaseSection),
        codeunits=read(CodeunitsSection),
        web=read(WebSection),
        source=None if path is None else Path(os.path.abspath(path)),
    )


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
        raise ConfigError(f"{path}: line {lineno}: not 'Key = value': {line}") from err
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
        for key, text in parser.items(spelled, raw=True):
            if key.lower() in given[section]:
                raise ConfigError(f"{path}: [{section}] {key}: key given twice")
            given[section][key.lower()] = _Value(key, text, str(path))


def _read_environ(environ: Mapping[str, str], given: _Given) -> None:
    sections = {name.upper(): name for name in given}
    for variable, text in environ.items():
        prefix, _, rest = variable.partition("_")
        section_part, _, key = rest.partition("_")
        section = sections.get(section_part.upper())
        # Other PBT_* variables (PBT_SOCKET is the client's) are not ours to judge.
        if prefix != "PBT" or section is None:
            continue
        given[section][key.lower()] = _Value(key, text.strip(), variable)
