"""The scenarios of ``scripts/cluster test``, run inside the client host's namespace.

Each check prints one line: ``PASS``, ``FAIL``, ``SKIP`` (a feature this checkout does not
have yet; never a pass) or ``XFAIL`` (fails today for a known reason in the product); the
numbers go into one table at the end (and ``--json``). The scenarios that break something put
it back in a ``finally``, so one failure does not spoil the next: the destructive ones come
last. Modules: ``basics``, ``performance`` (2-4), ``database_outage`` (5), ``broker_outage``
(6-7).

1. **basics**: a cue through HAProxy reads the standby; sessions spread over both brokers;
   a wrong token is refused through the balancer too; the standby refuses a write;
   ``connect([addresses])`` and the web bridge if this checkout has them.
2. **hop cost**: no-op round trip and throughput through HAProxy against a direct connection
   to the same broker; throughput with one and with two brokers; CPU per part.
3. **cue cost**: a role center cue (a count on the standby) per second, and its CPU.
4. **replica lag**: rows committed on the primary, watched for by a cue on the standby.
5. **standby outage**: stop the standby under load: database error codes, brokers stay up,
   sessions recover when it returns; then a longer outage during which a worker is replaced.
6. **broker failover**: SIGKILL a broker under load: ConnectionLost at once, new sessions on
   the survivor, the survivor's sessions untouched, one outcome per task.
7. **frozen broker**: SIGSTOP a broker: only a client keepalive (or an application-level
   health check in HAProxy) can notice.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable

from tests.broker_process import alive
from tests.cluster import brokers
from tests.cluster.basics import basics
from tests.cluster.broker_outage import broker_failover, frozen_broker
from tests.cluster.database_outage import long_standby_outage, standby_outage
from tests.cluster.performance import cue_cost, hop_cost, replica_lag
from tests.cluster.report import Report
from tests.cluster.topology import BROKERS


def _check_alive() -> None:
    for host in BROKERS:
        pid = brokers.pid(host)
        if pid is None or not alive(pid):
            raise AssertionError(f"broker {host.name} is not running")


SCENARIOS: list[tuple[str, Callable[[Report], object]]] = [
    ("basics", basics),
    ("hop cost", hop_cost),
    ("cue cost", cue_cost),
    ("replica lag", replica_lag),
    ("standby outage", lambda report: asyncio.run(standby_outage(report))),
    ("long standby outage", lambda report: asyncio.run(long_standby_outage(report))),
    ("broker failover", lambda report: asyncio.run(broker_failover(report))),
    ("frozen broker", lambda report: asyncio.run(frozen_broker(report))),
]


def main(json_path: str | None = None, only: set[str] | None = None) -> int:
    report = Report()
    started = time.monotonic()
    report.number("machine", {"cpus": os.cpu_count(), "load_average": os.getloadavg()})
    for name, scenario in SCENARIOS:
        if only and name not in only:
            continue
        with report.scenario(name):
            _check_alive()
            scenario(report)
    report.number("total_seconds", round(time.monotonic() - started, 1))
    report.numbers["machine"]["load_average_end"] = os.getloadavg()
    print("--- numbers")
    print(json.dumps(report.numbers, indent=1, sort_keys=True))
    passed = sum(1 for status, _, _ in report.checks if status == "PASS")
    skipped = [name for status, name, _ in report.checks if status == "SKIP"]
    known = [name for status, name, _ in report.checks if status == "XFAIL"]
    failed = [name for status, name, _ in report.checks if status == "FAIL"]
    print(
        f"--- {passed} passed, {len(failed)} failed, {len(skipped)} skipped,"
        f" {len(known)} known failures"
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
        + (f" (known failures: {', '.join(known)})" if known else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    if json_path:
        with open(json_path, "w") as file:
            json.dump({"checks": report.checks, "numbers": report.numbers}, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
