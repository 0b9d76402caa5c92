"""pbt_server.testing: one codeunit as a child session, and the pytest plugin's broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pbt_server.errors import BackgroundTaskError, UnknownCodeunit
from pbt_server.testing import run_page_background_task
from tests import codeunits as cu
from tests.broker_process import REPO, make_database


@pytest.fixture
def database(tmp_path: Path) -> str:
    make_database(tmp_path / "erp.db")
    return f"sqlite:///{tmp_path / 'erp.db'}"


def run(codeunit: int, parameters: dict[str, str] | None = None, **kw: object) -> dict[str, str]:
    return run_page_background_task(codeunit, parameters, modules=["tests.codeunits"], **kw)  # type: ignore[arg-type]


def test_a_codeunit_runs_as_a_child_session_and_returns_its_results(database: str) -> None:
    assert run(cu.ECHO, {"a": "b"}, database_url=database) == {"a": "b"}
    assert run(cu.DB_READ, database_url=database) == {"blocked": "10"}
    results = run(cu.BEHAVE, database_url=database, context={"user": "ALICE"})
    assert results["context"] == repr({"user": "ALICE"})
    context = run(cu.CONTEXT, database_url=database, record_id="Customer: 10000")
    assert context["record_id"] == "Customer: 10000"
    assert context["pid"] != str(__import__("os").getpid())  # a worker process of its own


def test_a_codeunit_that_reports_progress_runs_and_shows_it(database: str) -> None:
    seen: list[dict[str, str]] = []
    params = {"steps": "5", "pause": "0.02"}  # 20 ms apart: past the worker's 10 ms gap
    assert run(cu.PROGRESS, params, database_url=database, on_progress=seen.append) == {
        "steps": "5"
    }
    assert [p["done"] for p in seen] == ["1", "2", "3", "4", "5"]
    assert run(cu.PROGRESS, params, database_url=database) == {"steps": "5"}


@pytest.mark.parametrize(
    ("codeunit", "code", "text"),
    [
        (cu.RAISE, "ValueError", "boom"),
        (cu.CUSTOM_ERROR, "CUST:Blocked", "Customer is blocked"),
        (cu.DB_WRITE, "DB:WriteDenied", "readonly database"),
        (cu.BAD_RESULT, "ChildSessionInvalidResult", "not str -> str"),
    ],
)
def test_a_failure_raises_with_the_code_the_error_trigger_would_get(
    database: str, codeunit: int, code: str, text: str
) -> None:
    with pytest.raises(BackgroundTaskError) as caught:
        run(codeunit, database_url=database)
    assert caught.value.code == code
    assert text in caught.value.text
    if code != "ChildSessionInvalidResult":
        assert "Traceback" in caught.value.call_stack


def test_a_codeunit_past_its_timeout_is_killed(database: str, tmp_path: Path) -> None:
    with pytest.raises(BackgroundTaskError) as caught:
        run(cu.SPIN, database_url=database, timeout=200)
    assert caught.value.code == "ChildSessionTaskTimeout"


def test_an_unknown_codeunit_is_refused(database: str) -> None:
    with pytest.raises(UnknownCodeunit):
        run(987_654, database_url=database)


def test_the_pytest_plugin_gives_a_test_a_session_with_its_own_broker(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    make_database(project / "erp.db")
    (project / "app" / "__init__.py").write_text("")
    (project / "app" / "cues.py").write_text(
        textwrap.dedent(
            """
            from pbt_server import codeunit

            @codeunit(4242, name="BlockedCustomers")
            def blocked(ctx):
                (n,) = ctx.db.execute("SELECT count(*) FROM customer WHERE blocked = 1").fetchone()
                return {"Blocked": str(n)}
            """
        )
    )
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\npbt_modules = "app.cues"\npbt_database_url = "sqlite:///erp.db"\n'
    )
    (project / "test_cues.py").write_text(
        textwrap.dedent(
            """
            def test_the_cue(pbt_server):
                page = pbt_server.open_page("Role Center")
                task = page.enqueue_background_task(4242)
                assert task.result(timeout=30) == {"Blocked": "10"}
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cues.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
