"""server.ini loading: defaults, every key, exact error messages, env overrides, paths."""

from __future__ import annotations

import configparser
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from pbt_server.config import (
    SECTIONS,
    AsyncProcessingSection,
    CodeunitsSection,
    DatabaseSection,
    DatabaseUrl,
    ServerConfig,
    ServerSection,
    WebSection,
    WorkersSection,
    keys,
    load_config,
    render_ini,
    render_markdown,
)
from pbt_server.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "server.ini"
README = REPO / "README.md"
TOKEN = "s3cret-token-0123456789"

# The keys the product's contract says the shipped file lists; every declared key must be
# shipped too, and nothing else.
CONTRACT_KEYS = {
    "Server": {"SocketPath", "TcpAddress", "AuthToken", "PidFile", "LogFile", "LogLevel"},
    "AsynchronousProcessing": {
        "ChildSessionsMaxConcurrency",
        "ChildSessionsMaxQueueLength",
        "PageBackgroundTaskDefaultTimeout",
        "PageBackgroundTaskMaxTimeout",
    },
    "Workers": {"Count", "MaxTasksPerWorker", "MaxMemoryMB"},
    "Database": {"Url"},
    "Codeunits": {"Modules"},
    "Web": {"ReconnectGrace", "AllowedOrigins", "AllowedCodeunits", "MaxMessageBytes"},
}
DECLARED = {cls.SECTION: {spec.name for _, spec in keys(cls)} for cls in SECTIONS}


def write_ini(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.ini"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ServerConfig:
    return load_config(write_ini(tmp_path, text), environ=environ or {}, base_dir=tmp_path)


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    assert info.value.code == "ConfigError"
    return info.value.text


# --- defaults and the shipped file --------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load_config(None, environ={}, base_dir=tmp_path)
    assert config == ServerConfig(
        server=ServerSection(
            socket_path=tmp_path / "var" / "pbt.sock",
            tcp_address=None,
            auth_token="",
            pid_file=tmp_path / "var" / "pbt-server.pid",
            log_file=tmp_path / "var" / "pbt-server.log",
            log_level="INFO",
            log_format="text",
            max_frame_bytes=1048576,
            max_connections=4096,
            max_buffered_mb=256,
            metrics_address=None,
            event_loop="auto",
        ),
        asynchronous_processing=AsyncProcessingSection(
            max_concurrency=5,
            max_queue_length=100,
            default_timeout_ms=120_000,
            max_timeout_ms=600_000,
            progress_interval_ms=100,
        ),
        workers=WorkersSection(
            count=5,
            max_tasks_per_worker=0,
            max_memory_mb=0,
            result_cache_mb=64,
            cancel_grace_ms=50,
            ack_timeout_ms=5000,
        ),
        database=DatabaseSection(
            url=DatabaseUrl(
                f"sqlite:///{tmp_path}/var/demo.db", "sqlite", tmp_path / "var" / "demo.db"
            ),
            isolation="RepeatableRead",
            statement_timeout_ms=0,
        ),
        codeunits=CodeunitsSection(modules=("workers.demo",)),
        web=WebSection(
            reconnect_grace_ms=10_000,
            allowed_origins=(),
            allowed_codeunits=frozenset(),
            max_message_bytes=65536,
        ),
        source=None,
        base_dir=tmp_path,
    )


def test_shipped_file_gives_exactly_the_defaults(tmp_path: Path) -> None:
    shipped = load_config(SHIPPED, environ={}, base_dir=tmp_path)
    assert shipped.source == SHIPPED
    assert dataclasses.replace(shipped, source=None) == load_config(
        None, environ={}, base_dir=tmp_path
    )


def test_shipped_file_is_rendered_from_the_declarations() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == render_ini(), (
        "config/server.ini drifted from pbt_server/config.py: run"
        " `python -m pbt_server.config ini > config/server.ini`"
    )


def test_shipped_file_lists_every_key_with_a_comment() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(SHIPPED, encoding="utf-8")
    shipped = {s: set(parser[s]) for s in parser.sections()}
    assert shipped == DECLARED
    for section, names in CONTRACT_KEYS.items():
        assert names <= shipped[section]
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(";"):
            assert lines[i - 1].startswith("; "), f"no comment above {line!r}"


def test_readme_table_is_rendered_from_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    begin, end = "<!-- config:begin -->\n", "<!-- config:end -->"
    assert begin in text, "README.md lost its config table markers"
    assert end in text, "README.md lost its config table markers"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == render_markdown(), (
        "README.md's config table drifted: paste `python -m pbt_server.config markdown`"
    )


def test_os_environ_is_the_default_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PBT_WORKERS_COUNT", "7")
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.workers.count == 7
    assert config.server.socket_path == tmp_path / "var" / "pbt.sock"


# --- every key parsed ---------------------------------------------------------------------


def test_every_key_is_parsed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
[Server]
SocketPath = run/s.sock
TcpAddress = 127.0.0.1:7085
AuthToken = {TOKEN}
PidFile = /srv/pbt/pbt.pid
LogFile = logs/pbt.log   ; inline comment
LogLevel = debug
LogFormat = JSON
MaxFrameBytes = 2048
MaxConnections = 10
MaxBufferedMB = 64
MetricsAddress = [::]:9185
EventLoop = AsyncIO

[AsynchronousProcessing]
ChildSessionsMaxConcurrency = 2
ChildSessionsMaxQueueLength = 1
PageBackgroundTaskDefaultTimeout = 00:00:30
PageBackgroundTaskMaxTimeout = 01:00:00
ProgressInterval = 00:00:00.250

[Workers]
Count = 256
MaxTasksPerWorker = 1000
MaxMemoryMB = 512
AckTimeout = 00:00:02

[Database]
Url = postgresql://pbt@db.example/pbt
Isolation = serializable
StatementTimeout = 00:00:30

[Codeunits]
Modules = workers.demo, mypkg.cues
          mypkg.stats
""",
    )
    assert config.server == ServerSection(
        socket_path=tmp_path / "run" / "s.sock",
        tcp_address=("127.0.0.1", 7085),
        auth_token=TOKEN,
        pid_file=Path("/srv/pbt/pbt.pid"),
        log_file=tmp_path / "logs" / "pbt.log",
        log_level="DEBUG",
        log_format="json",
        max_frame_bytes=2048,
        max_connections=10,
        max_buffered_mb=64,
        metrics_address=("::", 9185),
        event_loop="asyncio",
    )
    assert config.asynchronous_processing == AsyncProcessingSection(
        max_concurrency=2,
        max_queue_length=1,
        default_timeout_ms=30_000,
        max_timeout_ms=3_600_000,
        progress_interval_ms=250,
    )
    assert config.workers == WorkersSection(
        count=256,
        max_tasks_per_worker=1000,
        max_memory_mb=512,
        result_cache_mb=64,
        cancel_grace_ms=50,
        ack_timeout_ms=2000,
    )
    assert config.database == DatabaseSection(
        url=DatabaseUrl("postgresql://pbt@db.example/pbt", "postgresql"),
        isolation="Serializable",
        statement_timeout_ms=30_000,
    )
    assert config.codeunits.modules == ("workers.demo", "mypkg.cues", "mypkg.stats")


def test_every_web_key_is_parsed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[Web]
ReconnectGrace = 00:00:02.500
AllowedOrigins = https://ERP.example.com/, http://127.0.0.1:8000
AllowedCodeunits = 50100 50101,50102
MaxMessageBytes = 4096
""",
    )
    assert config.web == WebSection(
        reconnect_grace_ms=2500,
        allowed_origins=("https://erp.example.com", "http://127.0.0.1:8000"),
        allowed_codeunits=frozenset({50100, 50101, 50102}),
        max_message_bytes=4096,
    )


def test_keys_and_sections_are_case_insensitive(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[workers]\ncount = 3\n[ASYNCHRONOUSPROCESSING]\nchildsessionsmaxconcurrency = 1\n",
    )
    assert config.workers.count == 3
    assert config.asynchronous_processing.max_concurrency == 1


def test_message_uses_canonical_key_spelling(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[workers]\ncOUNT = four\n")
    assert text == f"{tmp_path / 'server.ini'}: [Workers] Count = 'four': not an integer"


def test_ipv6_tcp_address(tmp_path: Path) -> None:
    config = load(tmp_path, f"[Server]\nTcpAddress = [::1]:7085\nAuthToken = {TOKEN}\n")
    assert config.server.tcp_address == ("::1", 7085)


def test_auth_token_is_not_in_the_repr(tmp_path: Path) -> None:
    config = load(tmp_path, f"[Server]\nAuthToken = {TOKEN}\n")
    assert TOKEN not in repr(config)


def test_a_bad_auth_token_is_not_echoed(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[Server]\nAuthToken = tooshort-secret\n")
    assert "tooshort" not in text
    assert text == (
        f"{tmp_path / 'server.ini'}: [Server] AuthToken = '***':"
        " must be at least 16 characters (empty = no token)"
    )


# --- bad values: exact message naming file, section, key, value ---------------------------

BAD_VALUES = [
    ("Workers", "AckTimeout", "00:00:00", "must be longer than zero"),
    ("Server", "MaxBufferedMB", "0", "must be at least 1"),
    (
        "Database",
        "Isolation",
        "chaos",
        "must be one of RepeatableRead, ReadCommitted, Serializable",
    ),
    (
        "Database",
        "StatementTimeout",
        "soon",
        "not a timespan; expected [d.]hh:mm:ss[.fff], e.g. 00:02:00",
    ),
    ("Workers", "Count", "four", "not an integer"),
    ("Workers", "Count", "0", "must be between 1 and 256"),
    ("Workers", "Count", "1_000", "not an integer"),
    ("Workers", "MaxMemoryMB", "-1", "must be at least 0"),
    ("AsynchronousProcessing", "ChildSessionsMaxConcurrency", "0", "must be at least 1"),
    ("AsynchronousProcessing", "ChildSessionsMaxQueueLength", "", "not an integer"),
    ("AsynchronousProcessing", "ChildSessionsMaxQueueLength", "0", "must be at least 1"),
    ("Server", "MaxConnections", "0", "must be between 1 and 1048576"),
    (
        "AsynchronousProcessing",
        "PageBackgroundTaskMaxTimeout",
        "10 minutes",
        "not a timespan; expected [d.]hh:mm:ss[.fff], e.g. 00:02:00",
    ),
    (
        "AsynchronousProcessing",
        "PageBackgroundTaskMaxTimeout",
        "1:60:00",
        "minutes and seconds must be 0-59",
    ),
    (
        "AsynchronousProcessing",
        "PageBackgroundTaskMaxTimeout",
        "00:00:60",
        "minutes and seconds must be 0-59",
    ),
    (
        "AsynchronousProcessing",
        "PageBackgroundTaskMaxTimeout",
        "24:00:00",
        "hours must be 0-23; write longer spans as d.hh:mm:ss",
    ),
    (
        "AsynchronousProcessing",
        "PageBackgroundTaskDefaultTimeout",
        "0:00:00",
        "must be longer than zero",
    ),
    ("Server", "LogLevel", "verbose", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("Server", "EventLoop", "trio", "must be one of auto, asyncio, uvloop"),
    ("Server", "MaxFrameBytes", "512", "must be between 1024 and 67108864"),
    ("Server", "SocketPath", "", "must not be empty"),
    ("Server", "TcpAddress", "7085", "expected host:port, e.g. 127.0.0.1:7085"),
    ("Server", "TcpAddress", "::1:7085", "write an IPv6 address in brackets, e.g. [::1]:7085"),
    (
        "Server",
        "TcpAddress",
        ":7085",
        "name the host, e.g. 127.0.0.1:7085 (0.0.0.0 for every interface)",
    ),
    ("Server", "TcpAddress", "localhost:http", "port must be a number from 0 to 65535, not 'http'"),
    (
        "Server",
        "TcpAddress",
        "localhost:70000",
        "port must be a number from 0 to 65535, not '70000'",
    ),
    ("Database", "Url", "mysql://db/pbt", "expected sqlite:///path or postgresql://..."),
    (
        "Database",
        "Url",
        "sqlite://demo.db",
        "write sqlite:///relative/path or sqlite:////absolute/path",
    ),
    (
        "Database",
        "Url",
        "sqlite:///:memory:",
        "name a database file; workers cannot share an in-memory one",
    ),
    ("Codeunits", "Modules", " , ", "names no module; at least one is needed"),
    ("Codeunits", "Modules", "workers.demo, my-cues", "'my-cues' is not a dotted module name"),
    ("Codeunits", "Modules", "workers.class", "'workers.class' is not a dotted module name"),
    ("Codeunits", "Modules", "a.b a.b", "lists 'a.b' twice"),
    ("Web", "ReconnectGrace", "10", "not a timespan; expected [d.]hh:mm:ss[.fff], e.g. 00:02:00"),
    ("Web", "AllowedOrigins", "*", "'*' is not an origin like https://app.example.com"),
    (
        "Web",
        "AllowedOrigins",
        "https://a.example/app",
        "'https://a.example/app' is not an origin like https://app.example.com",
    ),
    ("Web", "AllowedCodeunits", "50100, all", "'all' is not a codeunit id"),
    ("Web", "AllowedCodeunits", "-1", "'-1' is not a codeunit id"),
    ("Web", "MaxMessageBytes", "100", "must be between 1024 and 67108864"),
]


@pytest.mark.parametrize(("section", "key", "value", "reason"), BAD_VALUES)
def test_bad_value_message_names_file_section_key_and_value(
    tmp_path: Path, section: str, key: str, value: str, reason: str
) -> None:
    text = config_error(tmp_path, f"[{section}]\n{key} = {value}\n")
    shown = value.strip()
    assert text == f"{tmp_path / 'server.ini'}: [{section}] {key} = '{shown}': {reason}"


def test_error_chains_the_converter_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[Workers]\nCount = four\n")
    assert isinstance(info.value.__cause__, ValueError)


def test_file_name_is_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "server.ini").write_text("[Workers]\nCount = four\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("config/server.ini", environ={})
    assert info.value.text == "config/server.ini: [Workers] Count = 'four': not an integer"


# --- structure errors ---------------------------------------------------------------------


def test_unknown_section(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[Wrkers]\nCount = 4\n")
    assert text == (
        f"{tmp_path / 'server.ini'}: [Wrkers]: unknown section (known: Server,"
        " AsynchronousProcessing, Workers, Database, Codeunits, Web)"
    )


def test_default_section_is_unknown_not_merged(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[DEFAULT]\nCount = 4\n[Workers]\n")
    assert text == f"{tmp_path / 'server.ini'}: [DEFAULT]: unknown section"


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[Workers]\nCuont = 4\n")
    assert text == (
        f"{tmp_path / 'server.ini'}: [Workers] Cuont: unknown key"
        " (known: Count, MaxTasksPerWorker, MaxMemoryMB, ResultCacheMB, CancelGrace, AckTimeout)"
    )


@pytest.mark.parametrize(
    "ini",
    ["[Workers]\nCount = 4\nCount = 5\n", "[Workers]\nCount = 4\ncount = 5\n"],
    ids=["same-case", "other-case"],
)
def test_duplicate_key(tmp_path: Path, ini: str) -> None:
    text = config_error(tmp_path, ini)
    assert text.startswith(f"{tmp_path / 'server.ini'}: [Workers] ")
    assert text.endswith(": key given twice")


@pytest.mark.parametrize(
    "ini",
    ["[Workers]\n[Workers]\n", "[Workers]\nCount = 4\n[workers]\nMaxMemoryMB = 1\n"],
    ids=["same-case", "other-case"],
)
def test_duplicate_section(tmp_path: Path, ini: str) -> None:
    assert config_error(tmp_path, ini).endswith(": section given twice")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={}, base_dir=tmp_path)
    assert info.value.text == f"{path}: cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("ini", "reason"),
    [
        ("Count = 4\n", "line 1: key before any [Section]"),
        ("[Workers]\nthis is not a key\n", "line 2: not 'Key = value': this is not a key"),
    ],
)
def test_unparseable_file(tmp_path: Path, ini: str, reason: str) -> None:
    assert config_error(tmp_path, ini) == f"{tmp_path / 'server.ini'}: {reason}"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "server.ini"
    path.write_bytes(b"[Workers]\nCount = \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={}, base_dir=tmp_path)
    assert info.value.text.startswith(f"{path}: not UTF-8 text")


# --- environment overrides ----------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[Workers]\nCount = 2\n",
        {
            "PBT_WORKERS_COUNT": "8",
            "PBT_ASYNCHRONOUSPROCESSING_CHILDSESSIONSMAXCONCURRENCY": "3",
            "PBT_SERVER_SOCKETPATH": "/tmp/other.sock",
        },
    )
    assert config.workers.count == 8
    assert config.asynchronous_processing.max_concurrency == 3
    assert config.server.socket_path == Path("/tmp/other.sock")


def test_env_applies_without_a_file(tmp_path: Path) -> None:
    config = load_config(None, environ={"PBT_WORKERS_MAXMEMORYMB": "256"}, base_dir=tmp_path)
    assert config.workers.max_memory_mb == 256


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[Workers]\nCount = 2\n", {"PBT_WORKERS_COUNT": "x"})
    assert text == "PBT_WORKERS_COUNT: [Workers] Count = 'x': not an integer"


def test_unknown_env_key_in_known_section(tmp_path: Path) -> None:
    text = config_error(tmp_path, "", {"PBT_WORKERS_MAX_MEMORY_MB": "5"})
    assert text == (
        "PBT_WORKERS_MAX_MEMORY_MB: [Workers] MAX_MEMORY_MB: unknown key"
        " (known: Count, MaxTasksPerWorker, MaxMemoryMB, ResultCacheMB, CancelGrace, AckTimeout)"
    )


def test_other_pbt_variables_are_ignored(tmp_path: Path) -> None:
    environ = {
        "PBT_SOCKET": "/tmp/client.sock",
        "PBT_CLIENT_TIMEOUT": "x",
        "XPBT_WORKERS_COUNT": "x",
    }
    config = load(tmp_path, "", environ)
    assert config.server.socket_path == tmp_path / "var" / "pbt.sock"
    assert config.workers.count == 5


def test_env_can_switch_tcp_off(tmp_path: Path) -> None:
    ini = f"[Server]\nTcpAddress = 127.0.0.1:7085\nAuthToken = {TOKEN}\n"
    config = load(tmp_path, ini, {"PBT_SERVER_TCPADDRESS": ""})
    assert config.server.tcp_address is None


def test_uvloop_named_but_not_installed_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    text = config_error(tmp_path, "[Server]\nEventLoop = uvloop\n")
    assert text.endswith(
        "[Server] EventLoop = 'uvloop': uvloop is not installed:"
        " pip install 'pbt-server[fast]' (or say auto)"
    )
    assert load(tmp_path, "[Server]\nEventLoop = auto\n").server.event_loop == "auto"


# --- timespans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timespan", "millis"),
    [
        ("00:00:01.5", 1500),
        ("00:00:00.001", 1),
        ("00:00:01.2345678", 1234),
        ("0:02:00", 120_000),
        ("23:59:59", 86_399_000),
        ("1.00:00:00", 86_400_000),
        ("2.01:00:00.25", 2 * 86_400_000 + 3_600_000 + 250),
    ],
)
def test_timespan_forms(tmp_path: Path, timespan: str, millis: int) -> None:
    config = load(
        tmp_path,
        "[AsynchronousProcessing]\nPageBackgroundTaskDefaultTimeout = 00:00:00.001\n"
        f"PageBackgroundTaskMaxTimeout = {timespan}\n",
    )
    assert config.asynchronous_processing.max_timeout_ms == millis


def test_default_timeout_above_max_is_rejected(tmp_path: Path) -> None:
    text = config_error(
        tmp_path,
        "[AsynchronousProcessing]\nPageBackgroundTaskDefaultTimeout = 00:05:00\n"
        "PageBackgroundTaskMaxTimeout = 00:01:00\n",
    )
    assert text == (
        f"{tmp_path / 'server.ini'}: [AsynchronousProcessing] PageBackgroundTaskDefaultTimeout"
        " = '00:05:00': must not exceed PageBackgroundTaskMaxTimeout (00:01:00)"
    )


def test_lowering_max_below_the_built_in_default_is_rejected(tmp_path: Path) -> None:
    text = config_error(
        tmp_path, "", {"PBT_ASYNCHRONOUSPROCESSING_PAGEBACKGROUNDTASKMAXTIMEOUT": "00:01:00"}
    )
    assert text == (
        f"{tmp_path / 'server.ini'}: [AsynchronousProcessing] PageBackgroundTaskDefaultTimeout"
        " = '00:02:00': must not exceed PageBackgroundTaskMaxTimeout (00:01:00)"
    )


# --- cross-key checks ---------------------------------------------------------------------


def test_tcp_requires_a_token(tmp_path: Path) -> None:
    text = config_error(tmp_path, "[Server]\nTcpAddress = 0.0.0.0:7085\n")
    assert text == (
        f"{tmp_path / 'server.ini'}: [Server] TcpAddress = '0.0.0.0:7085': TCP needs an AuthToken"
    )


def test_socket_path_too_long_for_af_unix(tmp_path: Path) -> None:
    name = "s" * 120 + ".sock"
    text = config_error(tmp_path, f"[Server]\nSocketPath = {name}\n")
    prefix = f"{tmp_path / 'server.ini'}: [Server] SocketPath = '{name}': resolves to "
    assert text.startswith(prefix + str(tmp_path / name))
    assert "longer than the 107 bytes a Unix socket path may have" in text


def test_deep_base_dir_makes_the_default_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 110)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={}, base_dir=deep)
    assert info.value.text.startswith("<defaults>: [Server] SocketPath = 'var/pbt.sock': ")


# --- paths and URLs -----------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    base = tmp_path / "app"
    ini = write_ini(tmp_path, "[Server]\nSocketPath = ../run/pbt.sock\nLogFile = log/x.log\n")
    config = load_config(ini, environ={}, base_dir=base)
    assert config.server.socket_path == tmp_path / "run" / "pbt.sock"
    assert config.server.log_file == base / "log" / "x.log"
    assert config.server.pid_file == base / "var" / "pbt-server.pid"
    assert config.database.url.path == base / "var" / "demo.db"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load(tmp_path, "[Server]\nPidFile = /run/pbt/pbt.pid\n")
    assert config.server.pid_file == Path("/run/pbt/pbt.pid")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///data/cues.db", "sqlite:///{base}/data/cues.db"),
        ("SQLite:///data/cues.db", "sqlite:///{base}/data/cues.db"),
        ("sqlite:////srv/cues.db", "sqlite:////srv/cues.db"),
        ("postgresql://pbt:pw@db:5432/pbt", "postgresql://pbt:pw@db:5432/pbt"),
        ("postgres://db/pbt", "postgres://db/pbt"),
    ],
)
def test_database_url_is_normalised(tmp_path: Path, url: str, expected: str) -> None:
    config = load(tmp_path, f"[Database]\nUrl = {url}\n")
    assert config.database.url.text == expected.format(base=tmp_path)


def test_a_sqlite_url_is_parsed_once_with_its_escapes_decoded(tmp_path: Path) -> None:
    # The demo creates the file this names, and the workers open the same one.
    config = load(tmp_path, "[Database]\nUrl = sqlite:///var/my%20db.sqlite\n")
    assert config.database.url.path == tmp_path / "var" / "my db.sqlite"
    assert config.database.url.backend == "sqlite"
