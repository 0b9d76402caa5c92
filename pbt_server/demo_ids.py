"""The demo's codeunit ids: what the demo pages enqueue and ``workers/demo.py`` registers."""

from typing import Final

WAIT: Final = 50100
BLOCKED_CUSTOMERS: Final = 50101
CUSTOMER_COUNT: Final = 50102
BLOCKED_BY_REASON: Final = 50103
CUSTOMER_LIST: Final = 50104
DEMO_CODEUNITS: Final = frozenset(
    {WAIT, BLOCKED_CUSTOMERS, CUSTOMER_COUNT, BLOCKED_BY_REASON, CUSTOMER_LIST}
)
