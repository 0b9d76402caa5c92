"""Where a no-op task's time goes: CPU µs per task in the client, the broker and the workers.

::

    .venv/bin/python -m benchmarks.breakdown                      # sync client, sequential
    .venv/bin/python -m benchmarks.breakdown --client aio --inflight 8
    .venv/bin/python -m benchmarks.breakdown --strace             # + syscalls per task
    .venv/bin/python -m benchmarks.breakdown --py-spy /tmp/spy    # + py-spy profiles
    .venv/bin/python -m benchmarks.breakdown --set Server.EventLoop=uvloop
    .venv/bin/python -m benchmarks.breakdown --repeat 5 --variant base=/tmp/base --variant new=.

A broker (the benchmark's, ``benchmarks/broker.py``) and one client process
(``breakdown_client.py``) run ``--tasks`` no-op tasks after a warm-up. Each process's CPU
time is read from the kernel before and after (``/proc/<pid>/task/*/schedstat``: nanoseconds
of CPU of every thread, the main thread apart; the user / kernel split from
``/proc/<pid>/stat``'s ticks). CPU per task is steadier than the wall clock on a shared
machine, though not immune (a busy neighbour slows caches and the hypervisor's steal counts
as ours); the wall-clock p50 and the load average are printed alongside.

``--variant NAME=TREE[,BROKER_TREE][@Section.Key=Value...]`` (repeatable) compares source
trees, e.g. an unpacked ``git archive`` of the base commit against this checkout, or broker
settings (``--variant plain=.@Server.EventLoop=asyncio``): the windows are interleaved, the
order rotated each round, and each figure is also given as the median of its per-round
ratios against the first variant. ``--repeat R`` runs R rounds.

``--strace`` attaches ``strace -c -f`` to each process for the measured window (it slows
everything; its CPU figures are not comparable, its counts are); ``--py-spy DIR`` records
``py-spy record --native -r 1000 --format raw`` of each process (the first round) and prints
the functions with the most samples, leaving out those of waiting threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

from benchmarks.broker import REPO, BrokerProcess
from benchmarks.cells import die_with_parent
from benchmarks.timing import percentile

TICK: Final = os.sysconf("SC_CLK_TCK")
SYSCALLS: Final = ("write", "sendto", "read", "recvfrom", "epoll_wait", "futex", "poll")


# --- CPU time of a process, every thread --------------------------------------------------


@dataclass(frozen=True)
class Cpu:
    ns: int  # schedstat: CPU time of every live thread, nanoseconds
    main_ns: int  # ... of the main thread
    user: int  # ticks
    system: int  # ticks


def cpu_of(pid: int) -> Cpu:
    ns = main = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            used = int(f.read().split()[0])
            ns += used
            if tid == str(pid):
                main = used
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return Cpu(ns, main, int(fields[11]), int(fields[12]))


@dataclass
class Usage:
    """CPU one process spent over the measured window, per task."""

    name: str
    total_us: float
    main_us: float  # the main thread's part
    user_us: float
    system_us: float


def usage(name: str, before: Cpu, after: Cpu, tasks: int) -> Usage:
    total = (after.ns - before.ns) / 1e3 / tasks
    user, system = after.user - before.user, after.system - before.system
    share = user / (user + system) if user + system else 1.0
    main = (after.main_ns - before.main_ns) / 1e3 / tasks
    return Usage(name, total, main, total * share, total * (1 - share))


# --- tracers ------------------------------------------------------------------------------------


@dataclass
class Tracer:
    name: str
    process: subprocess.Popen[bytes]
    output: Path


def start_strace(name: str, pid: int, directory: Path) -> Tracer:
    output = directory / f"{name}.strace"
    process = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(output), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Tracer(name, process, output)


def traced(pid: int) -> bool:
    """Every thread of ``pid`` has a tracer attached."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            if "TracerPid:\t0\n" in f.read():
                return False
    return True


def start_py_spy(name: str, pid: int, directory: Path) -> Tracer:
    output = directory / f"{name}.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "--native", "-r", "1000", "--format", "raw"]
    process = subprocess.Popen(
        [*command, "-o", str(output), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Tracer(name, process, output)


def stop(tracer: Tracer) -> None:
    if tracer.process.poll() is not None:
        return
    tracer.process.send_signal(signal.SIGINT)  # both write their output on SIGINT
    try:
        tracer.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        tracer.process.kill()
        tracer.process.wait()


def strace_counts(path: Path) -> Counter[str]:
    """Calls per syscall from an ``strace -c`` summary."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and re.fullmatch(r"[\d.]+", parts[0]) and parts[-1] != "total":
                calls = parts[3]
                if calls.isdigit():
                    counts[parts[-1]] += int(calls)
    return counts


_FRAME: Final = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")
# Leaf frames of a thread that waits (py-spy --native samples them as if running): a
# blocking syscall, or an unnamed libc address (the futex waits of locks and the GIL).
_WAITING: Final = frozenset(
    {
        "read",
        "recv",
        "poll",
        "epoll_wait",
        "select",
        "sem_wait",
        "sem_clockwait",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "clock_nanosleep",
        "nanosleep",
        "accept",
        "waitpid",
        "wait4",
        "__futex_abstimed_wait_common",
        "epoll_pwait",
    }
)


def _waiting(leaf: str) -> bool:
    name, _, where = leaf.partition(" ")
    return "libc.so" in where and (name in _WAITING or name.startswith("0x"))


def py_spy_summary(path: Path, top: int) -> list[str]:
    """The functions with the most samples: own (leaf) and inclusive, as % of the samples
    that were not waiting."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = [_short(frame) for frame in stack.split(";")]
            if _waiting(frames[-1]):
                waiting += n
                continue
            total += n
            own[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples running ({waiting} waiting, left out); own:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return lines


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "lib/python3", "wt-perf/", "/"):
        if marker in file:
            file = file.rsplit(marker, 1)[1]
            break
    return f"{match['func']} ({file})"


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Window:
    usages: list[Usage]
    wall_p50_us: float
    wall_p99_us: float
    tasks_per_s: float
    syscalls: dict[str, Counter[str]] = field(default_factory=dict)


@dataclass
class Variant:
    """A client tree measured against a broker tree (by default the same one)."""

    name: str
    client_tree: Path
    broker_tree: Path
    settings: tuple[str, ...] = ()  # Section.Key=Value of this variant's broker
    broker: BrokerProcess | None = None
    client: subprocess.Popen[str] | None = None
    windows: list[Window] = field(default_factory=list)

    def start(
        self,
        args: argparse.Namespace,
        root: Path,
        brokers: dict[tuple[Path, tuple[str, ...]], BrokerProcess],
    ) -> None:
        settings = (*args.set, *self.settings)
        broker = brokers.get((self.broker_tree, settings))
        if broker is None:
            broker = BrokerProcess.start("breakdown", _settings(settings), root, self.broker_tree)
            brokers[(self.broker_tree, settings)] = broker
        self.broker = broker
        script = Path(__file__).with_name("breakdown_client.py")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
        env["PYTHONPATH"] = str(self.client_tree)
        counts = (args.tasks, args.inflight, args.warmup)
        self.client = subprocess.Popen(
            [sys.executable, str(script), broker.socket, args.client, *map(str, counts)],
            cwd=self.client_tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        assert self.client.stdout is not None
        if self.client.stdout.readline().strip() != "ready":
            raise SystemExit(f"variant {self.name}: the client did not start")

    def processes(self) -> dict[str, int]:
        """Client, broker and each worker (the standby among them, idle)."""
        assert self.broker is not None
        assert self.client is not None
        named = {"client": self.client.pid, "broker": self.broker.pid}
        workers = sorted(p.pid for p in psutil.Process(self.broker.pid).children())
        for i, pid in enumerate(workers):
            named[f"worker {i + 1}"] = pid
        return named

    def go(self) -> tuple[list[float], float]:
        assert self.client is not None
        assert self.client.stdin is not None
        assert self.client.stdout is not None
        self.client.stdin.write("go\n")
        self.client.stdin.flush()
        answer = json.loads(self.client.stdout.readline())
        return answer["samples"], answer["elapsed"]

    def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                assert self.client.stdin is not None
                self.client.stdin.write("stop\n")
                self.client.stdin.close()
            try:
                self.client.wait(30)
            except subprocess.TimeoutExpired:
                self.client.kill()
                self.client.wait()


def measure(variant: Variant, tasks: int, tracers: Callable[[str, int], Tracer] | None) -> Window:
    named = variant.processes()
    running: list[Tracer] = []
    try:
        if tracers is not None:
            for name, pid in named.items():
                running.append(tracers(name, pid))
            deadline = time.monotonic() + 10
            while not all(traced(pid) for pid in named.values()) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        before = {name: cpu_of(pid) for name, pid in named.items()}
        samples, elapsed = variant.go()
        after = {name: cpu_of(pid) for name, pid in named.items()}
    finally:
        # Also when the window failed: a tracer left attached keeps its process stopped.
        for tracer in running:
            stop(tracer)
    usages = [usage(name, before[name], after[name], tasks) for name in named]
    us = [s * 1e6 for s in samples]
    window = Window(usages, percentile(us, 50), percentile(us, 99), tasks / elapsed)
    for tracer in running:
        if tracer.output.suffix == ".strace":
            window.syscalls[tracer.name] = strace_counts(tracer.output)
    return window


def _settings(pairs: Sequence[str]) -> dict[str, dict[str, str]]:
    settings: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise SystemExit(f"--set wants Section.Key=Value, not {pair!r}")
        settings.setdefault(section, {})[name] = value
    return settings


def _variants(specs: Sequence[str]) -> list[Variant]:
    if not specs:
        return [Variant("this tree", REPO, REPO)]
    variants = []
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if not eq:
            raise SystemExit(f"--variant wants NAME=CLIENT_TREE[,BROKER_TREE], not {spec!r}")
        trees, *settings = rest.split("@")
        client, _, broker = trees.partition(",")
        client_tree = Path(client).resolve()
        broker_tree = Path(broker).resolve() if broker else client_tree
        variants.append(Variant(name, client_tree, broker_tree, tuple(settings)))
    return variants


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="pbt-breakdown-", dir="/tmp"))
    spy_dir = Path(args.py_spy) if args.py_spy else None
    variants = _variants(args.variant)
    brokers: dict[tuple[Path, tuple[str, ...]], BrokerProcess] = {}
    try:
        for variant in variants:
            variant.start(args, root, brokers)
        load_before = os.getloadavg()
        for i in range(args.repeat):
            # Interleaved, the order rotated each round: drift hits every variant alike.
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for variant in order:
                tracers: Callable[[str, int], Tracer] | None = None
                if args.strace:
                    tracers = lambda name, pid: start_strace(name, pid, root)  # noqa: E731
                elif spy_dir is not None and i == 0:
                    where = spy_dir / variant.name.replace(" ", "-")
                    where.mkdir(parents=True, exist_ok=True)
                    tracers = lambda name, pid, where=where: start_py_spy(name, pid, where)  # noqa: E731
                variant.windows.append(measure(variant, args.tasks, tracers))
        load_after = os.getloadavg()
        for variant in variants:
            variant.stop()
        print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
        for variant in variants:
            report(args, variant, spy_dir)
        if len(variants) > 1:
            compare(variants)
    except BaseException:
        for broker in brokers.values():
            print(broker.log_tail()[-2000:], file=sys.stderr)
        raise
    finally:
        for variant in variants:
            if variant.client is not None and variant.client.poll() is None:
                variant.client.kill()
                variant.client.wait()
        for broker in brokers.values():
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _median(variant: Variant, name: str, metric: str) -> float:
    values = [getattr(u, metric) for w in variant.windows for u in w.usages if u.name == name]
    return statistics.median(values) if values else 0.0


def report(args: argparse.Namespace, variant: Variant, spy_dir: Path | None) -> None:
    windows = variant.windows
    shape = "sequential" if args.inflight == 1 else f"{args.inflight} in flight"
    print(
        f"\n{variant.name}: {args.client} client, {shape}, {args.tasks} no-op tasks"
        f" x {len(windows)} window(s) (medians)"
    )
    med = statistics.median
    names = [u.name for u in windows[0].usages]
    print("| process | CPU µs/task | main thread | other threads | user | kernel |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for name in names:
        total, main, user, system = (
            _median(variant, name, m) for m in ("total_us", "main_us", "user_us", "system_us")
        )
        totals = [totals[0] + total, totals[1] + user, totals[2] + system]
        if not total:
            continue  # an idle process (the standby worker)
        cells = (total, main, total - main, user, system)
        print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in cells) + " |")
    print(f"| **all** | {totals[0]:.1f} | | | {totals[1]:.1f} | {totals[2]:.1f} |")
    print(
        f"wall p50 {med(w.wall_p50_us for w in windows):.0f} µs, "
        f"p99 {med(w.wall_p99_us for w in windows):.0f} µs, "
        f"{med(w.tasks_per_s for w in windows):,.0f} tasks/s"
    )
    if len(windows) > 1:
        per_window = [f"{w.usages[0].total_us:.0f}/{w.wall_p50_us:.0f}" for w in windows]
        print("client CPU / wall p50 per window (µs):", ", ".join(per_window))
    if windows[0].syscalls:
        print("syscalls per task (strace -c -f, median of windows):")
        for name in names:
            counts = Counter[str]()
            for call in {c for w in windows for c in w.syscalls.get(name, {})}:
                counts[call] = int(med(w.syscalls.get(name, Counter())[call] for w in windows))
            if not counts:
                continue
            shown = ", ".join(
                f"{call} {n / args.tasks:.2f}"
                for call, n in counts.most_common()
                if n >= args.tasks / 20
            )
            print(f"  {name}: {shown} (all {sum(counts.values()) / args.tasks:.2f})")
    if spy_dir is not None:
        where = spy_dir / variant.name.replace(" ", "-")
        for name in names:
            print(f"--- py-spy: {name}")
            for line in py_spy_summary(where / f"{name}.txt", args.top):
                print(line)


def compare(variants: list[Variant]) -> None:
    """Each variant against the first, window by window (the same round of the run)."""
    base = variants[0]
    print(f"\nagainst {base.name}, median of the per-round ratios:")
    for variant in variants[1:]:
        rounds = list(zip(base.windows, variant.windows, strict=True))
        cells = []
        for label, pick in (
            ("client CPU", lambda w: w.usages[0].total_us),
            ("broker CPU", lambda w: w.usages[1].total_us),
            ("all CPU", lambda w: sum(u.total_us for u in w.usages)),
            ("wall p50", lambda w: w.wall_p50_us),
        ):
            ratio = statistics.median(pick(b) and pick(v) / pick(b) for b, v in rounds)
            cells.append(f"{label} {ratio:.2f}x")
        print(f"  {variant.name}: " + ", ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.breakdown", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--client", choices=("sync", "aio"), default="sync")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per measured window")
    parser.add_argument(
        "--inflight", type=int, default=1, help="aio: tasks in flight; sync: threads"
    )
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="measured windows (median)")
    parser.add_argument("--set", action="append", default=[], metavar="Section.Key=Value")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=CLIENT_TREE[,BROKER_TREE][@Section.Key=Value...]",
        help="compare source trees or settings (interleaved; the first is the baseline)",
    )
    parser.add_argument("--strace", action="store_true", help="count syscalls (slows the run)")
    parser.add_argument("--py-spy", metavar="DIR", help="record py-spy profiles into DIR")
    parser.add_argument("--top", type=int, default=15, help="py-spy functions shown")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
