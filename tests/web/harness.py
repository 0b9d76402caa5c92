"""Helpers of the browser tests: a page of the test app driven through window.pbt."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import BrowserContext, Page

from tests.broker_process import BrokerProcess
from tests.support import wait_until

# Records what the page's triggers and the session's callbacks saw, on window.h.
HARNESS = """async ([name, record]) => {
  window.h = {completed: [], errors: [], notes: [], closed: []};
  const session = await pbt.connect();
  session.onNotification = (n) => h.notes.push(n);
  session.onClose = (error) => h.closed.push(error ? error.code : null);
  const page = await session.openPage(name, record);
  page.onCompleted = (taskId, results) => h.completed.push([taskId, results]);
  page.onError = (taskId, code, text) => { h.errors.push([taskId, code, text]); return true; };
  window.session = session;
  window.p = page;
  return session.id;
}"""


def open_test_page(
    context: BrowserContext, base_url: str, name: str = "Test", record: str = "A"
) -> tuple[Page, int]:
    """A tab on the test page, with one pbt page open; returns it and its session id."""
    page = context.new_page()
    page.goto(f"{base_url}/test")
    session_id: int = page.evaluate(HARNESS, [name, record])
    return page, session_id


def enqueue(page: Page, codeunit: int, parameters: dict[str, str], **options: Any) -> int:
    task_id: int = page.evaluate(
        "([c, params, options]) => p.enqueueBackgroundTask(c, params, options)",
        [codeunit, parameters, options],
    )
    return task_id


def rejection(page: Page, script: str, arg: Any = None) -> dict[str, Any]:
    """Run ``script`` (a promise-returning function) and return the error it rejects with."""
    result: dict[str, Any] = page.evaluate(
        f"""async (arg) => {{
            try {{ await ({script})(arg); return {{code: "resolved"}}; }}
            catch (e) {{ return {{code: e.code || e.name, message: e.message,
                                 isError: e instanceof Error}}; }}
        }}""",
        arg,
    )
    return result


def busy_worker(broker: BrokerProcess, session_id: int, task_id: int) -> int:
    """Wait until a worker runs the task; return its pid."""

    def running() -> int | None:
        for worker in broker.status()["workers"]:
            if worker["task"] == f"s{session_id}/t{task_id}" and worker["state"] == "busy":
                return int(worker["pid"])
        return None

    pid: int = wait_until(running, timeout=15)
    return pid


def broker_sessions(broker: BrokerProcess) -> set[int]:
    """Session ids the broker has, less the one asking."""
    with broker.connect() as session:
        sessions: list[dict[str, Any]] = session.status()["sessions"]  # type: ignore[assignment]
        return {s["id"] for s in sessions} - {session.id}
