"""The client core's frame tap: it sees every broker frame, before the frame is applied."""

from __future__ import annotations

from pbt_server.client._core import Core, PageState, TaskState
from pbt_server.protocol import Message


class Flag:
    def set(self) -> None:
        pass


def test_the_tap_sees_each_frame_before_the_core_applies_it() -> None:
    core = Core(max_frame=1 << 20)
    core.welcome({"op": "reply", "rid": 1, "session": 7})
    page = PageState(3, "Customer Card", "Customer: 10000")
    core.add_page(page)
    task: TaskState[PageState] = TaskState(page, Flag())
    fields = core.enqueue(page, task, 50100, {}, None, "Error")
    pending, _ = core.request("enqueue", fields, Flag(), task)
    seen: list[tuple[str, bool]] = []

    def tap(message: Message) -> None:
        seen.append((str(message["op"]), task.done()))

    core.tap = tap
    core.receive({"op": "reply", "rid": pending.rid, "task": 1, "timeout": 120_000})
    core.receive({"op": "completed", "task": 1, "page": 3, "results": {"A": "1"}})
    core.receive({"op": "shutdown", "code": "ServerShuttingDown", "text": "bye"})
    assert seen == [("reply", False), ("completed", False), ("shutdown", True)]
    assert task.done()
