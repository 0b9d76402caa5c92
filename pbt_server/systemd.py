"""Tell systemd how the broker is doing (``Type=notify``): ready, reloading, stopping.

The protocol is one datagram per state change, ``KEY=value`` lines, to the Unix socket named
by ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). The variable is taken out
of the environment at start, so workers and what codeunits start cannot speak for the
broker. Without the variable every call does nothing. A send never blocks the event loop:
a full socket drops the datagram (systemd reads them at once).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Final

VARIABLE: Final = "NOTIFY_SOCKET"

_address: str | bytes | None = None


def take_socket() -> None:
    """Remember ``$NOTIFY_SOCKET`` and remove it from the environment (call once, first)."""
    global _address
    text = os.environ.pop(VARIABLE, "")
    if not text:
        _address = None
    elif text.startswith("@"):
        _address = b"\0" + text[1:].encode()
    else:
        _address = text


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False if nobody listens."""
    if _address is None:
        return False
    data = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(data, socket.MSG_DONTWAIT, _address)
    except OSError:
        return False
    return True


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def reloading() -> None:
    # systemd 253+ wants the time the reload began, to tell one reload from the next.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> None:
    notify("STOPPING=1", "STATUS=stopping")
