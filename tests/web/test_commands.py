"""``pbt-server web`` and ``pbt-server demo --web``: the real commands, in their own process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import codeunits as cu
from tests.broker_process import REPO, write_ini
from tests.support import wait_until
from tests.web.harness import broker_sessions
from tests.web.wsclient import hello, open_socket, read_to_close, request, run, send


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _serving(process: subprocess.Popen[str], url: str) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"exited with {process.returncode}:\n{process.communicate()[0]}")
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _start(arguments: list[str], **options: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pbt_server", *arguments],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **options,  # type: ignore[call-overload]
    )


def _stop(process: subprocess.Popen[str], sig: signal.Signals) -> str:
    process.send_signal(sig)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"did not stop on {sig.name}:\n{out}") from None
    assert process.returncode == 0, out
    return out


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pbt-webdemo-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_demo_web_serves_the_role_center(demo_dir: Path, context):
    ini = demo_dir / "server.ini"
    write_ini(
        ini,
        {
            "Server": {
                "SocketPath": str(demo_dir / "pbt.sock"),
                "PidFile": str(demo_dir / "pbt.pid"),
                "LogFile": str(demo_dir / "pbt.log"),
            },
            "Workers": {"Count": "2"},
            "Database": {"Url": f"sqlite:///{demo_dir}/demo.db"},
        },
    )
    port = _free_port()
    demo = _start(["demo", "--web", "--config", str(ini), "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until(lambda: _serving(demo, url), timeout=60)
        page = context.new_page()
        page.goto(url)
        cue = page.locator("#cue-blocked-customers")
        assert cue.get_attribute("data-pbt-cue") == "50101"
        page.wait_for_function(
            "document.getElementById('cue-blocked-customers').dataset.pbtState === 'done'",
            timeout=30_000,
        )
        with sqlite3.connect(f"{(demo_dir / 'demo.db').as_uri()}?mode=ro", uri=True) as db:
            (blocked,) = db.execute("SELECT count(*) FROM customer WHERE blocked <> ''").fetchone()
        db.close()
        assert cue.inner_text() == str(blocked)
        page.goto(url + "customer")
        page.wait_for_function(
            "document.getElementById('factbox').dataset.filledBy", timeout=30_000
        )
        page.close()
    finally:
        out = _stop(demo, signal.SIGINT)
    assert f"Role Center:   {url}" in out
    assert f"Customer Card: {url}customer" in out
    assert "created demo database" in out
    assert "stopped pbt-server (exit code 0)" in out
    assert not (demo_dir / "pbt.sock").exists()


def test_pbt_server_web_serves_the_bridge(start_broker):
    broker = start_broker()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    environ = {**os.environ, "PBT_WEB_ALLOWEDCODEUNITS": str(cu.ECHO)}
    web = _start(["web", "--config", str(broker.config), "--port", str(port)], env=environ)
    try:
        wait_until(lambda: _serving(web, base + "/pbt.js"), timeout=60)
        with urllib.request.urlopen(base + "/pbt.js", timeout=5) as response:
            script = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/javascript")
        assert "window.pbt" in script

        async def main() -> tuple[dict[str, object], dict[str, object], list[str]]:
            tab = await open_socket(f"ws://127.0.0.1:{port}/ws", base)
            await hello(tab)
            page = await request(tab, {"op": "open_page", "rid": 1, "name": "P", "record": ""})
            enqueue = {"op": "enqueue", "page": page["page"], "parameters": {"k": "v"}}
            enqueue |= {"timeout": None, "level": "Error"}
            allowed = await request(tab, {**enqueue, "rid": 2, "codeunit": cu.ECHO})
            refused = await request(tab, {**enqueue, "rid": 3, "codeunit": cu.NOOP})
            await send(tab, {"op": "close"})
            return allowed, refused, [m["op"] for m in await read_to_close(tab)]

        allowed, refused, rest = run(main())
        assert allowed["op"] == "reply"
        assert refused["code"] == "CodeunitNotAllowed"  # [Web] AllowedCodeunits lists only ECHO
        assert rest in ([], ["completed"])
        wait_until(lambda: not broker_sessions(broker))
    finally:
        _stop(web, signal.SIGTERM)


def test_the_broker_and_the_plain_clients_do_not_import_the_web_extra():
    code = (
        "import sys, pbt_server.broker, pbt_server.client, pbt_server.client.aio, pbt_server.cli\n"
        "loaded = [m for m in ('starlette', 'uvicorn', 'pbt_server.web') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_without_the_web_extra_the_command_says_what_to_install(tmp_path: Path):
    # A stand-in for an environment without starlette: an import of it fails.
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ImportError(name='starlette')\n")
    environ = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    result = subprocess.run(
        [sys.executable, "-m", "pbt_server", "web"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "pip install 'pbt-server[web]'" in result.stderr


def test_web_broker_needs_host_port_and_the_token(tmp_path: Path):
    def web(*argv: str, token: str = "") -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
        if token:
            environ["PBT_SERVER_AUTHTOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "pbt_server", "web", *argv],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = web("--broker", "10.0.0.1", token="t" * 32)
    assert bad.returncode == 2
    assert "--broker '10.0.0.1'" in bad.stderr
    assert "host:port" in bad.stderr
    tokenless = web("--broker", "10.0.0.1:7085")
    assert tokenless.returncode == 2
    assert "AuthToken" in tokenless.stderr
