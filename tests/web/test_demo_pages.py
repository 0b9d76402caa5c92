"""The demo's Role Center and Customer Card in a real browser, against a real broker."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from tests.broker_process import alive
from tests.support import wait_until
from tests.web.conftest import CUSTOMERS, DemoBroker
from tests.web.harness import busy_worker
from tests.web.server import WebServer

CUES = {
    "cue-blocked-customers": "SELECT count(*) FROM customer WHERE blocked <> ''",
    "cue-customers": "SELECT count(*) FROM customer",
    "cue-blocked-ship": "SELECT count(*) FROM customer WHERE blocked = 'Ship'",
    "cue-blocked-invoice": "SELECT count(*) FROM customer WHERE blocked = 'Invoice'",
    "cue-blocked-all": "SELECT count(*) FROM customer WHERE blocked = 'All'",
}


def _expected(demo: DemoBroker) -> dict[str, str]:
    with sqlite3.connect(f"{demo.database.as_uri()}?mode=ro", uri=True) as db:
        counts = {cue: str(db.execute(sql).fetchone()[0]) for cue, sql in CUES.items()}
    db.close()
    return counts


def _running_tasks(demo: DemoBroker) -> int:
    return sum(1 for w in demo.broker.status()["workers"] if w["state"] == "busy")


# Every state the blocked-customers cue is in, from the first paint on.
CUE_LOG = """
window.addEventListener("DOMContentLoaded", () => {
  const cue = document.getElementById("cue-blocked-customers");
  const log = () => cueLog.push({text: cue.textContent, state: cue.dataset.pbtState || null});
  window.cueLog = [];
  log();
  new MutationObserver(log).observe(cue, {subtree: true, childList: true, characterData: true,
                                          attributes: true});
});
"""


def test_role_center_shows_dash_until_the_counts_arrive(demo_broker, web: WebServer, context):
    expected = _expected(demo_broker)
    assert expected["cue-customers"] == str(CUSTOMERS)
    assert int(expected["cue-blocked-customers"]) > 0
    page = context.new_page()
    page.add_init_script(CUE_LOG)
    page.goto(web.url + "/")
    blocked = page.locator("#cue-blocked-customers")
    assert blocked.get_attribute("data-pbt-cue") == "50101"
    # While its task runs in a worker (Delay 1500 ms), the cue shows "-".
    wait_until(lambda: _running_tasks(demo_broker) > 0)
    state, text = page.evaluate("[cueLog.at(-1).state, cueLog.at(-1).text]")
    assert (state, text) in (("pending", "-"), ("done", expected["cue-blocked-customers"]))
    page.wait_for_function(
        "[...document.querySelectorAll('[data-pbt-cue]')]"
        ".every((el) => el.dataset.pbtState === 'done')",
        timeout=20_000,
    )
    shown = {cue: page.inner_text(f"#{cue}") for cue in CUES}
    assert shown == expected
    # What the cue ever showed: "-" from the start until the count, nothing in between.
    texts = [entry["text"] for entry in page.evaluate("cueLog")]
    assert [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]] == [
        "-",
        expected["cue-blocked-customers"],
    ]
    page.close()


def test_customer_card_fills_the_factbox(web: WebServer, context):
    page = context.new_page()
    page.goto(web.url + "/customer?wait=300")
    page.wait_for_function(
        "document.getElementById('factbox').dataset.filledBy"
        " && document.getElementById('factbox').dataset.filledBy"
        " === document.getElementById('factbox').dataset.task",
        timeout=20_000,
    )
    assert page.inner_text("#customer-no") == "C10000"
    before = datetime.fromisoformat(page.inner_text("#field-before"))
    after = datetime.fromisoformat(page.inner_text("#field-after"))
    duration = page.inner_text("#field-duration")
    assert duration.endswith(" ms")
    assert int(duration.removesuffix(" ms")) >= 300
    assert after > before
    assert page.locator("#customers button").count() == 25
    # A task past its timeout: the error trigger is unhandled, so a Warning notification shows.
    page.click("#run-timeout")
    note = page.locator(".note[data-code='ChildSessionTaskTimeout']")
    note.wait_for(timeout=20_000)
    assert "Customer Card: ChildSessionTaskTimeout: Child Session task was terminated" in (
        note.inner_text()
    )
    assert note.get_attribute("class") == "note Warning"
    assert page.inner_text("#field-before") == "-"
    page.close()


# Every change of the factbox, with the record on the card at that moment.
FACTBOX_LOG = """
window.addEventListener("DOMContentLoaded", () => {
  window.factboxLog = [];
  const box = document.getElementById("factbox");
  new MutationObserver(() => factboxLog.push({
    no: document.getElementById("customer-no").textContent,
    task: box.dataset.task || null,
    filledBy: box.dataset.filledBy || null,
    duration: document.getElementById("field-duration").textContent,
  })).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
});
"""


def test_picking_another_customer_cancels_the_running_task(
    demo_broker: DemoBroker, web: WebServer, context
):
    broker = demo_broker.broker
    page = context.new_page()
    page.add_init_script(FACTBOX_LOG)
    page.goto(web.url + "/customer?wait=30000")
    page.wait_for_function("document.getElementById('factbox').dataset.task", timeout=20_000)
    first = int(page.get_attribute("#factbox", "data-task") or 0)
    session_id = page.evaluate("pbt.connect().then((s) => s.id)")
    pid = busy_worker(broker, session_id, first)

    page.fill("#wait", "200")
    page.click("#customers button[data-no='C10020']")
    page.wait_for_function(
        "document.getElementById('factbox').dataset.filledBy"
        " && document.getElementById('factbox').dataset.filledBy"
        " === document.getElementById('factbox').dataset.task",
        timeout=20_000,
    )
    second = int(page.get_attribute("#factbox", "data-task") or 0)
    assert second > first
    assert page.inner_text("#customer-no") == "C10020"
    assert int(page.inner_text("#field-duration").removesuffix(" ms")) < 30000

    # The first task's worker was killed and replaced, not left running for 30 s.
    wait_until(lambda: not alive(pid))
    workers = broker.wait_workers_replaced(pid)
    assert pid not in workers
    log = page.evaluate("factboxLog")
    assert log, "the factbox never changed"
    assert all(entry["filledBy"] in (None, str(second)) for entry in log), log
    assert all(entry["duration"] in ("-", page.inner_text("#field-duration")) for entry in log)
    page.close()
