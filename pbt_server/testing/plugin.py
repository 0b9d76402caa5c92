"""The pytest plugin of pbt-server (registered as an entry point; nothing to configure).

Fixtures:

- ``pbt_server``: a connected session with a real broker running your codeunit modules on
  your database, stopped after the test. Set them in your pytest configuration::

      [tool.pytest.ini_options]
      pbt_modules = "myapp.cues myapp.stats"
      pbt_database_url = "sqlite:///tests/data/erp.db"

  or override the ``pbt_server_settings`` fixture to return ``server.ini`` settings.
- ``pbt_server_process``: the :class:`~pbt_server.testing.ServerProcess` behind it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pbt_server.client import Session
from pbt_server.testing.server import ServerProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("pbt_modules", "codeunit modules for the pbt_server fixture's broker")
    parser.addini("pbt_database_url", "[Database] Url for the pbt_server fixture's broker")


@pytest.fixture
def pbt_server_settings(request: pytest.FixtureRequest) -> dict[str, dict[str, str]]:
    """The broker's ``server.ini`` settings; override it to set more than modules and URL."""
    settings: dict[str, dict[str, str]] = {"Workers": {"Count": "2"}}
    modules = str(request.config.getini("pbt_modules") or "").strip()
    url = str(request.config.getini("pbt_database_url") or "").strip()
    if modules:
        settings["Codeunits"] = {"Modules": modules}
    if url:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            # relative to the project, not to wherever pytest was started
            url = f"sqlite:///{request.config.rootpath / url[len('sqlite:///') :]}"
        settings["Database"] = {"Url": url}
    return settings


@pytest.fixture
def pbt_server_process(
    pbt_server_settings: dict[str, dict[str, str]], request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """A real broker for this test, stopped (and its directory removed) after it."""
    with ServerProcess(pbt_server_settings, cwd=request.config.rootpath) as server:
        yield server


@pytest.fixture
def pbt_server(pbt_server_process: ServerProcess) -> Iterator[Session]:
    """A session connected to this test's broker."""
    with pbt_server_process.connect() as session:
        yield session
