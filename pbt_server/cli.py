"""The ``pbt-server`` command: ``run``, ``start``, ``stop``, ``reload``, ``status``,
``health``, ``web`` and ``demo``.

Exit codes: 0 success (``stop`` also when there was nothing to stop), 1 the command could not
do its job (already running, not running for ``status``, ``health`` and ``reload``, failed to
start or stop, a reload refused), 2 bad command line or bad configuration. ``run`` returns
the broker's own exit code.

The broker and the client are imported inside the commands that need them, so
``pbt-server --version`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pbt_server import __version__

if TYPE_CHECKING:
    from pbt_server.config import ServerConfig

DEFAULT_CONFIG = Path("config/server.ini")
"""Used when ``--config`` is not given and this file exists in the working directory."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
RELOAD_WAIT = 90.0  # seconds: the broker gives the new code 60 s to import
OPERATOR_FRAME = 1 << 26  # the largest frame there is (MaxFrameBytes' own maximum)


def main(argv: list[str] | None = None) -> int:
    """Run the ``pbt-server`` command line and return its exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse exits
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pbt-server", description="Run page background tasks in worker processes."
    )
    parser.add_argument("--version", action="version", version=f"pbt-server {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        help=f"server.ini to use (default: {DEFAULT_CONFIG} if it exists, else built-in defaults)",
    )
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    run = commands.add_parser("run", parents=[common], help="run the broker in the foreground")
    run.add_argument("--daemon", action="store_true", help="log only to LogFile (used by `start`)")
    run.add_argument(
        "--reload",
        action="store_true",
        help="reload whenever a codeunit module's file or server.ini changes (development)",
    )
    run.set_defaults(handler=_run)
    for name, handler, text in [
        ("start", _start, "start the broker in the background"),
        ("stop", _stop, "stop the background broker gracefully"),
        (
            "reload",
            _reload,
            "re-read server.ini and the codeunit modules without losing a session or a task",
        ),
        ("health", _health, "exit 0 if the broker answers and has its workers, else 1"),
    ]:
        commands.add_parser(name, parents=[common], help=text).set_defaults(handler=handler)
    status = commands.add_parser(
        "status", parents=[common], help="show sessions, tasks and workers of the running broker"
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(handler=_status)
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", default="127.0.0.1", help="address to serve HTTP on")
    listen.add_argument("--port", type=int, default=8000, help="port to serve HTTP on")
    web = commands.add_parser(
        "web", parents=[common, listen], help="serve the browser bridge (needs pbt-server[web])"
    )
    web.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="reach the broker over TCP (a balancer in front of several), with [Server]"
        " AuthToken; default: [Server] SocketPath",
    )
    web.set_defaults(handler=_web)
    demo = commands.add_parser(
        "demo",
        parents=[common, listen],
        help="create the demo database and compute a cue in the background",
    )
    demo.add_argument(
        "--web", action="store_true", help="serve the Role Center and Customer Card pages instead"
    )
    demo.set_defaults(handler=_demo)
    return parser


# --- commands ----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from pbt_server.daemon import AlreadyRunning, Pidfile

    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    pidfile = Pidfile(config.server.pid_file)
    try:
        pidfile.acquire()
    except AlreadyRunning as err:
        _error(f"pbt-server is already running (pid {err.pid})")
        return EXIT_FAILED
    except OSError as err:
        _error(f"pbt-server: {err.strerror or err}")
        return EXIT_FAILED
    try:
        from pbt_server.broker import run_broker

        lock = pidfile.fileno()
        private = (lock,) if lock is not None else ()
        return run_broker(
            config, log_to_stderr=not args.daemon, private_fds=private, watch=args.reload
        )
    finally:
        pidfile.release()


def _start(args: argparse.Namespace) -> int:
    from pbt_server.daemon import Pidfile, start_daemon

    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    pidfile = Pidfile(config.server.pid_file)
    if (pid := pidfile.running_pid()) is not None:
        _error(f"pbt-server is already running (pid {pid})")
        return EXIT_FAILED
    if (stale := pidfile.read()) is not None:
        print(
            f"pbt-server: pid file {pidfile.path} is stale "
            f"(pid {stale} does not hold it); replacing it"
        )
    return start_daemon(_config_path(args), config)


def _stop(args: argparse.Namespace) -> int:
    from pbt_server.daemon import stop_daemon

    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    return stop_daemon(config)


def _reload(args: argparse.Namespace) -> int:
    from pbt_server.client import connect
    from pbt_server.errors import ConnectionLost, PbtError

    config = _load_config(args)
    if config is None:
        print("nothing was reloaded", file=sys.stderr)
        return EXIT_USAGE
    socket_path = config.server.socket_path
    try:
        with connect(str(socket_path), timeout=10.0, operator=True, keepalive=None) as session:
            reply = session._request("reload", {}, timeout=RELOAD_WAIT)
    except ConnectionLost as err:
        from pbt_server.daemon import Pidfile

        pid = Pidfile(config.server.pid_file).running_pid()
        if pid is None:
            print(f"pbt-server is not running (no answer on {socket_path}: {err})")
        else:
            _error(
                f"pbt-server (pid {pid}) runs but does not answer on {socket_path}: if"
                " SocketPath was changed, the server still listens on the old one until a"
                f" restart; `kill -HUP {pid}` reloads everything else"
            )
        return EXIT_FAILED
    except (PbtError, TimeoutError) as err:
        code = getattr(err, "code", type(err).__name__)
        _error(f"pbt-server: reload refused; the running code and settings stay: {code}: {err}")
        return EXIT_FAILED
    seconds = reply["seconds"]
    print(
        f"reloaded in {seconds.get('total', 0) * 1000:.0f} ms:"
        f" {len(reply['codeunits'])} codeunit(s); busy workers switch after their task"
    )
    for key in reply["restart"]:
        print(f"  {key} changed; it applies only after a restart (stop, start)")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from pbt_server.errors import ConnectionLost, PbtError

    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    socket_path = config.server.socket_path
    try:
        report = _operator_status(str(socket_path))
    except ConnectionLost as err:
        print(f"pbt-server is not running (no answer on {socket_path}: {err})")
        return EXIT_FAILED
    except PbtError as err:
        _error(f"pbt-server: status failed: {err.code}: {err}")
        return EXIT_FAILED
    if args.json:
        import json

        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_status(report))
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    from pbt_server.errors import PbtError
    from pbt_server.report import health_problem

    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    socket_path = config.server.socket_path
    try:
        report = _operator_status(str(socket_path), timeout=5.0)
    except PbtError as err:
        print(f"unhealthy: no answer on {socket_path}: {err}")
        return EXIT_FAILED
    problem = health_problem(report)
    if problem is not None:
        print(f"unhealthy: {problem}")
        return EXIT_FAILED
    print("healthy")
    return EXIT_OK


def _operator_status(socket_path: str, timeout: float = 10.0) -> dict[str, Any]:
    """The broker's status through an operator's connection, which works when it is full."""
    from pbt_server.client import connect

    # A full server's report (every session with its context) can outgrow the frames a
    # session takes: an operator takes the largest the protocol allows.
    with connect(
        socket_path, timeout=timeout, operator=True, keepalive=None, max_frame=OPERATOR_FRAME
    ) as session:
        return session.status()


def _demo(args: argparse.Namespace) -> int:
    if args.web:
        config = _load_config(args)
        if config is None:
            return EXIT_USAGE
        web_demo = _import_web("pbt_server.web.demo")
        if web_demo is None:
            return EXIT_FAILED
        code: int = web_demo.main(config, _config_path(args), args.host, args.port)
        return code
    from pbt_server import demo  # lazy: the demo is optional and heavier than the CLI

    result: int = demo.main(_config_path(args))
    return result


def _web(args: argparse.Namespace) -> int:
    config = _load_config(args)
    if config is None:
        return EXIT_USAGE
    broker = None
    if args.broker is not None:
        from pbt_server.config import parse_tcp_address

        try:
            broker = parse_tcp_address(args.broker)
        except ValueError as err:
            _error(f"pbt-server web: --broker {args.broker!r}: {err}")
            return EXIT_USAGE
        if not config.server.auth_token:
            _error("pbt-server web: --broker needs the brokers' [Server] AuthToken")
            return EXIT_USAGE
    serve = _import_web("pbt_server.web.serve")
    if serve is None:
        return EXIT_FAILED
    code: int = serve.main(config, args.host, args.port, broker=broker)
    return code


def _import_web(module: str) -> Any:
    """Import a module of the web bridge; without the ``web`` extra say how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name not in ("starlette", "uvicorn"):
            raise
        _error(f"pbt-server: the browser bridge needs {err.name}: pip install 'pbt-server[web]'")
        return None


# --- helpers -----------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        path: Path = args.config
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _load_config(args: argparse.Namespace) -> ServerConfig | None:
    """Load the configuration; on a bad one print why and return None."""
    from pbt_server.config import load_config
    from pbt_server.errors import ConfigError

    try:
        return load_config(_config_path(args))
    except ConfigError as err:
        _error(f"pbt-server: {err}")
        return None


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def format_status(report: Mapping[str, Any]) -> str:
    """Render a broker ``status`` answer as the text ``pbt-server status`` prints."""
    server = report["server"]
    lines = [
        f"pbt-server {server['version']}  pid {server['pid']}  "
        f"up {format_duration(server['uptime'])}  "
        f"socket {server['socket']}  tcp {server.get('tcp') or 'off'}"
        + (f"  metrics {server['metrics']}" if server.get("metrics") else ""),
    ]
    totals = report.get("totals")
    if totals:
        states = ", ".join(f"{n} {state}" for state, n in totals["workers"].items() if n)
        lines.append(
            f"{totals['sessions']} sessions ({totals['pages']} pages), {totals['waiting']} "
            f"tasks waiting, {totals['running']} running; workers: {states or 'none'}; "
            f"standby {totals['standby']}"
        )
    lines += ["", "sessions:"]
    sessions = report.get("sessions") or []
    if sessions:
        rows = [[s["id"], s["pages"], s["waiting"], s["running"]] for s in sessions]
        lines += _table(["id", "pages", "waiting", "running"], rows, "rrrr")
    else:
        lines.append("  no sessions")
    lines += ["", "workers:"]
    workers = report.get("workers") or []
    if workers:
        rows = [
            [
                w["slot"],
                w.get("pid") or "-",
                w["state"],
                f"{w.get('rss', 0) / (1024 * 1024):.1f}",
                w.get("tasks_done", 0),
                w.get("task") or "-",
                w.get("codeunit") or "-",
                "-" if w.get("task_seconds") is None else f"{w['task_seconds']:.1f}",
            ]
            for w in workers
        ]
        headers = ["slot", "pid", "state", "rss MiB", "tasks done", "task", "codeunit", "for s"]
        lines += _table(headers, rows, "rrlrrlrr")
    else:
        lines.append("  no workers")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``"1:02:05"``; a day or more -> ``"2d 01:02:05"``."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """Indented columns; ``align`` has one letter per column, ``l`` or ``r``."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if a == "r" else v.ljust(w)
            for v, w, a in zip(values, widths, align, strict=True)
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers)] + [line(row) for row in cells]
