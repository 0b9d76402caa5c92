"""A codeunit module that starts a thread at import: threads do not survive a fork."""

import threading
import time

from pbt_server import ChildSession, codeunit

_STARTED = threading.Event()


def _poll() -> None:
    _STARTED.set()
    time.sleep(3600)


threading.Thread(target=_poll, daemon=True, name="poller").start()


@codeunit(9001, name="NeedsPoller")
def needs_poller(ctx: ChildSession) -> dict[str, str]:
    return {"started": str(_STARTED.is_set())}
