"""The log as an operator reads it: JSON lines with event ids, tasks' own records tagged,
everyday page traffic at DEBUG."""

from __future__ import annotations

import json

from pbt_server.client import connect
from tests import codeunits as cu
from tests.support import wait_until


def _lines(broker) -> list[dict]:
    return [json.loads(line) for line in broker.log.read_text().splitlines() if line.strip()]


def test_json_lines_carry_event_ids_and_task_fields(start_broker):
    broker = start_broker({"Server": {"LogFormat": "json", "LogLevel": "DEBUG"}})
    with broker.connect() as session:
        page = session.open_page("P")
        done = page.enqueue_background_task(cu.LOG, {"text": "from-the-codeunit"})
        done.result(timeout=20)
        failed = page.enqueue_background_task(cu.RAISE)
        failed.exception(timeout=20)
    wait_until(lambda: any(line.get("event") == "PBT0004" for line in _lines(broker)))
    lines = _lines(broker)
    by_event: dict[str | None, list[dict]] = {}
    for line in lines:
        by_event.setdefault(line.get("event"), []).append(line)
    for event in ("PBT0001", "PBT0002", "PBT0003"):
        (mine,) = [e for e in by_event[event] if e["task"] == done.id]
        assert (mine["session"], mine["page"], mine["codeunit"]) == (session.id, page.id, cu.LOG)
    completed = next(e for e in by_event["PBT0003"] if e["task"] == done.id)
    assert completed["wait_ms"] >= 0
    assert completed["run_ms"] >= 0
    (failure,) = [e for e in by_event["PBT0004"] if e["task"] == failed.id]
    assert failure["code"] == "ValueError"
    assert failure["level"] == "INFO"
    # the codeunit's own record, logged in its worker, says whose task it was
    (own,) = [line for line in lines if line["message"].endswith("from-the-codeunit")]
    assert (own["session"], own["task"], own["codeunit"]) == (session.id, done.id, cu.LOG)
    assert own["worker"] == own["pid"]  # logged in the worker, not by the broker
    assert own["pid"] != by_event["PBT0030"][0]["pid"]
    assert "PBT0030" in by_event  # ready


def test_text_lines_tag_a_tasks_own_records(start_broker):
    broker = start_broker({"Server": {"LogLevel": "INFO"}})
    with broker.connect() as session:
        page = session.open_page("P")
        task = page.enqueue_background_task(cu.LOG, {"text": "tagged-record"})
        task.result(timeout=20)
    tag = f"[s{session.id}/t{task.id} codeunit {cu.LOG}] codeunit says tagged-record"
    wait_until(lambda: tag in broker.log_text())


def test_record_changes_and_page_closes_are_debug_not_info(start_broker):
    broker = start_broker({"Server": {"LogLevel": "INFO"}})
    with connect(str(broker.socket)) as session:
        page = session.open_page("Customer Card", record_id="Customer: 1")
        for i in range(20):
            page.enqueue_background_task(cu.SLEEP, {"seconds": "5"})
            page.set_record(f"Customer: {i + 2}")  # cancels the task of the record left
        page.close()
        explicit = session.open_page("Other").enqueue_background_task(cu.SLEEP, {"seconds": "5"})
        explicit.cancel()
    # A user's cancel is INFO; it was logged after the record changes and the close, so
    # once it is in the file, their lines would be too.
    text = broker.wait_for_log("cancelled (Canceled)")
    assert "(RecordChanged)" not in text
    assert "(PageClosed)" not in text
