"""Who may connect and what they may run; the JS API's errors and trigger rules."""

from __future__ import annotations

from tests import codeunits as cu
from tests.support import wait_until
from tests.web import codeunits as web_cu
from tests.web.conftest import UNREGISTERED, DemoBroker, web_config
from tests.web.harness import broker_sessions, enqueue, open_test_page, rejection
from tests.web.server import WebServer


def test_a_browser_without_access_is_refused(demo_broker: DemoBroker, web: WebServer, context):
    context.add_cookies([{"name": "user", "value": "nobody", "url": web.url}])
    before = broker_sessions(demo_broker.broker)
    page = context.new_page()
    page.goto(web.url + "/test")
    error = rejection(page, "() => pbt.connect()")
    assert error["code"] == "AccessDenied"
    assert error["isError"] is True
    assert "may not open a session" in error["message"]
    assert broker_sessions(demo_broker.broker) == before
    assert not web.bridge.tabs
    page.close()


def test_enqueue_failures_reject_with_the_server_code(web: WebServer, context):
    page, _ = open_test_page(context, web.url)
    not_allowed = rejection(page, "() => p.enqueueBackgroundTask(50999, {})")
    assert not_allowed["code"] == "CodeunitNotAllowed"
    assert "50999" in not_allowed["message"]
    unknown = rejection(page, "(c) => p.enqueueBackgroundTask(c, {})", UNREGISTERED)
    assert unknown["code"] == "UnknownCodeunit"
    assert unknown["isError"] is True
    bad_value = rejection(page, "() => p.enqueueBackgroundTask(2, {n: 1})")
    assert bad_value["code"] == "InvalidParameters"
    bad_level = rejection(page, "() => p.enqueueBackgroundTask(2, {}, {errorLevel: 'Loud'})")
    assert bad_level["code"] == "InvalidParameters"
    closed = rejection(page, "async () => { await p.close(); return p.enqueueBackgroundTask(2); }")
    assert closed["code"] == "PageClosed"
    # None of it hurt the session: the refused enqueues used no TaskId.
    page.evaluate("window.p2 = null; session.openPage('Again').then((pg) => (window.p2 = pg))")
    wait_until(lambda: page.evaluate("window.p2 !== null"))
    assert page.evaluate("p2.enqueueBackgroundTask(2, {x: 'y'})") == 1
    page.close()


def test_a_trigger_never_runs_before_its_task_id_was_returned(web: WebServer, context):
    page, _ = open_test_page(context, web.url)
    order = page.evaluate(
        """async (codeunit) => {
          const known = new Set();
          const seen = [];
          let done;
          const all = new Promise((resolve) => (done = resolve));
          p.onCompleted = (taskId) => {
            seen.push(known.has(taskId));
            if (seen.length === 60) done();
          };
          for (let i = 0; i < 60; i++) known.add(await p.enqueueBackgroundTask(codeunit, {}));
          await all;
          return seen;
        }""",
        cu.NOOP,
    )
    assert order == [True] * 60
    page.close()


def test_cancelled_and_moved_tasks_run_no_trigger(web: WebServer, context):
    page, _ = open_test_page(context, web.url)
    cancelled = enqueue(page, cu.SLEEP, {"seconds": "0.3"})
    assert page.evaluate("(id) => p.cancelBackgroundTask(id)", cancelled) is True
    assert page.evaluate("(id) => p.cancelBackgroundTask(id)", cancelled) is False
    enqueue(page, cu.SLEEP, {"seconds": "0.3"})
    page.evaluate("p.setRecord('B')")
    # Started later and lasting longer than both: had they run a trigger, it would be in first.
    last = enqueue(page, cu.SLEEP, {"seconds": "0.6"})
    page.wait_for_function("h.completed.length >= 1", timeout=10_000)
    assert [task_id for task_id, _ in page.evaluate("h.completed")] == [last]
    page.close()


def test_unhandled_errors_become_notifications_of_their_level(web: WebServer, context):
    page, _ = open_test_page(context, web.url)
    unhandled = "(id, code, text) => { h.errors.push([id, code, text]); return false; }"
    page.evaluate(f"() => {{ p.onError = {unhandled}; }}")
    warning = enqueue(page, cu.RAISE, {"message": "nope"}, errorLevel="Warning")
    page.wait_for_function("h.notes.length === 1", timeout=10_000)
    [note] = page.evaluate("h.notes")
    assert (note["severity"], note["code"], note["text"]) == ("Warning", "ValueError", "nope")
    assert (note["taskId"], note["pageName"]) == (warning, "Test")
    assert page.evaluate("h.errors") == [[warning, "ValueError", "nope"]]
    enqueue(page, cu.RAISE, {"message": "quiet"}, errorLevel="Ignore")
    page.evaluate("() => { p.onCompleted = () => { throw new TypeError('trigger broke'); }; }")
    enqueue(page, cu.ECHO, {})
    page.wait_for_function("h.notes.length === 2", timeout=10_000)
    thrown = page.evaluate("h.notes[1]")
    assert (thrown["severity"], thrown["code"], thrown["text"]) == (
        "Error",
        "TypeError",
        "trigger broke",
    )
    # The Ignore one reaches onError (in its own time: two workers) but makes no notification.
    page.wait_for_function("h.errors.length === 2", timeout=10_000)
    assert page.evaluate("h.errors[1].slice(1)") == ["ValueError", "quiet"]
    assert len(page.evaluate("h.notes")) == 2
    page.close()


def test_context_reaches_the_child_session(web: WebServer, context):
    """Needs ``connect(..., context=...)`` from the client and ``ctx.context`` in workers."""
    context.add_cookies([{"name": "user", "value": "bob", "url": web.url}])
    page, _ = open_test_page(context, web.url)
    enqueue(page, web_cu.CONTEXT_MAP, {})
    page.wait_for_function("h.completed.length + h.errors.length === 1", timeout=10_000)
    assert page.evaluate("h.errors") == []
    [[_, results]] = page.evaluate("h.completed")
    assert results == {"user": "bob", "company": "CRONUS"}
    page.close()


def test_a_page_of_another_origin_may_not_connect(
    demo_broker: DemoBroker, web: WebServer, start_web, context
):
    other = start_web(web_config(demo_broker.broker))
    page = context.new_page()
    page.goto(other.url + "/test")
    error = rejection(page, "(url) => pbt.connect({url})", f"ws://127.0.0.1:{web.port}/pbt/ws")
    assert error["code"] == "OriginNotAllowed"
    assert other.url in error["message"]
    # Listed in [Web] AllowedOrigins, the same page may.
    listed = start_web(web_config(demo_broker.broker, allowed_origins=(other.url,)))
    url = f"ws://127.0.0.1:{listed.port}/pbt/ws"
    assert page.evaluate("(url) => pbt.connect({url}).then((s) => s.id)", url) > 0
    page.close()


def test_progress_reaches_on_progress_before_the_outcome(web: WebServer, context):
    page, _ = open_test_page(context, web.url)
    page.evaluate(
        """() => {
          h.progress = [];
          h.order = [];
          p.onProgress = (taskId, progress) => {
            h.progress.push([taskId, progress]);
            h.order.push("progress");
          };
          const completed = p.onCompleted;
          p.onCompleted = (taskId, results) => {
            h.order.push("completed");
            return completed(taskId, results);
          };
        }"""
    )
    task = enqueue(page, cu.PROGRESS, {"steps": "30", "pause": "0.01"})
    page.wait_for_function("h.completed.length === 1", timeout=20_000)
    order = page.evaluate("h.order")
    assert order[-1] == "completed"
    assert order.count("completed") == 1
    progress = page.evaluate("h.progress")
    assert progress
    assert {task_id for task_id, _ in progress} == {task}
    done = [int(value["done"]) for _, value in progress]
    assert done == sorted(done)
    assert all(value["of"] == "30" for _, value in progress)
    # A task that moved to another record shows no more progress.
    moved = enqueue(page, cu.PROGRESS, {"steps": "300", "pause": "0.01"})
    page.wait_for_function(f"h.progress.some(([id]) => id === {moved})", timeout=20_000)
    shown = page.evaluate(
        """(id) => {
          const shown = h.progress.filter(([taskId]) => taskId === id).length;
          p.setRecord("B");
          return shown;
        }""",
        moved,
    )
    last = enqueue(page, cu.PROGRESS, {"steps": "1", "pause": "0"})
    page.wait_for_function("h.completed.length === 2", timeout=20_000)
    assert [task_id for task_id, _ in page.evaluate("h.completed")][-1] == last
    later = page.evaluate("(id) => h.progress.filter(([taskId]) => taskId === id).length", moved)
    assert later == shown
    page.close()
