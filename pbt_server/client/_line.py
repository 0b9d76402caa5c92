"""The blocking flavour's socket, read by whichever thread is waiting (leader/follower).

A caller waiting for a reply or an outcome reads the socket itself when no other thread is
reading: it *leads*, and its answer reaches it without a thread switch. Other waiters
*follow*: they sleep until their answer arrives (the leader wakes them) or the leadership is
handed to them. When no caller waits, the session's reader thread (``pbt-client-reader``)
reads, so outcomes arrive, triggers run, keepalive pings go out and a dead connection is
seen whatever the application is doing.

::

    caller ─request─▶ enlist ─send─▶ broker
                        │
                        ▼                  the leader (one caller, or the reader thread):
                      wait ─┬─ leads ────▶ recv ─▶ core.receive under the session lock:
                            │               answers set their signals (followers wake),
                            │               trigger work goes to the dispatcher
                            └─ follows ──▶ sleeps until its signal is set or it is promoted

Who is told that data arrived. The socket is watched by two epoll instances, both
edge-triggered and ``EPOLLEXCLUSIVE``: the kernel offers each edge to the first (the one a
leading caller waits on) and wakes the second (the reader thread's) only when no caller is
waiting in the first. So the reader thread sleeps through a caller's round trips and is
never woken to hand the socket over or back. An edge the reader thread gets while a caller
leads (data that came while that caller was busy) is remembered (``missed``) under the
session lock, and the caller reads it before it lets go; a leader reads until the socket says
it is empty (EAGAIN), so nothing is ever left unread without an edge still to come.

Whoever leads waits with a timeout: the keepalive's (a ping after a quiet ``keepalive``, the
end after as long again without an answer) or its caller's own deadline; a caller that stops
waiting hands the leadership on. Whoever reads the end of the stream, a bad frame or a
socket error ends the session for all (:meth:`Line.end`): every pending handle fails, every
waiter wakes, and the reader thread closes the socket once no caller reads any more.

Nothing here ever blocks in a send while it leads: the broker stops reading a client that
does not read its events, so a leader stuck in a send would wait for itself. A request's
frame is sent without waiting (it fits, but for large ones); the rest of a large one is sent
after its caller has handed the leadership on.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from pbt_server.client._core import Core, TaskBase, Work
from pbt_server.errors import ConnectionLost, ProtocolError
from pbt_server.protocol import FrameDecoder

RECV_SIZE: Final = 64 * 1024  # under malloc's mmap threshold: no mmap per recv
# Edge-triggered, and exclusive: an edge wakes the first instance with a waiter, not both.
_EDGE: Final = select.EPOLLIN | select.EPOLLET | select.EPOLLEXCLUSIVE


class Waiter:
    """A thread's wake-up call: a lock used as a binary semaphore. Each thread reuses its own
    (:func:`waiter`); it is woken under the session lock and rearmed there."""

    __slots__ = ("_lock", "_woken")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._woken = False

    def wake(self) -> None:
        """(session lock held) Make the next or current :meth:`sleep` return."""
        if not self._woken:
            self._woken = True
            self._lock.release()

    def sleep(self, timeout: float | None) -> None:
        """(session lock not held) Wait until woken, at most ``timeout`` seconds."""
        if timeout is None:
            self._lock.acquire()
        else:
            self._lock.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))

    def rearm(self) -> None:
        """(session lock held) Forget a wake-up, consumed or not."""
        if self._woken:
            self._woken = False
            self._lock.acquire(blocking=False)  # a wake-up that came after a timed-out sleep


_local = threading.local()


def waiter() -> Waiter:
    """This thread's waiter."""
    found: Waiter | None = getattr(_local, "waiter", None)
    if found is None:
        found = _local.waiter = Waiter()
    return found


class Signal:
    """The core's signal in the blocking flavour: set under the session lock, it wakes the
    threads waiting for it. No lock of its own: one is allocated per thread, not per task."""

    __slots__ = ("_waiters", "is_set")

    def __init__(self) -> None:
        self.is_set = False
        self._waiters: list[Waiter] | None = None

    def set(self) -> None:
        if not self.is_set:  # idempotent: an outcome may signal on arrival and on decision
            self.is_set = True
            if self._waiters:
                for sleeper in self._waiters:
                    sleeper.wake()

    def add(self, sleeper: Waiter) -> None:
        if self._waiters is None:
            self._waiters = [sleeper]
        else:
            self._waiters.append(sleeper)

    def discard(self, sleeper: Waiter) -> None:
        if self._waiters is not None:
            with contextlib.suppress(ValueError):
                self._waiters.remove(sleeper)


class Line:
    """One session's socket and who reads it. Everything it shares with callers is guarded
    by the session lock (the core's)."""

    def __init__(
        self,
        sock: socket.socket,
        where: str,
        core: Core,
        lock: threading.Lock,
        decoder: FrameDecoder,
        keepalive: float | None,
        deliver: Callable[[list[Work]], None],
        finished: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._where = where
        self._core = core
        self._lock = lock
        self._decoder = decoder
        self._keepalive = keepalive
        self._deliver = deliver  # trigger work, to the dispatcher (called without the lock)
        self._finished = finished  # the reader thread is done: no more work will come
        self._send_lock = threading.Lock()  # one whole frame at a time on the socket
        self._leader: Waiter | None = None
        self._followers: deque[tuple[Waiter, Signal]] = deque()
        self._reader_waiter = Waiter()
        self._closing = False  # the reader thread waits for the last leader to let go
        self._missed = False  # an edge came while a caller led and was not waiting for it
        self._over = False  # the connection has ended: nobody reads any more
        self._heard_at = time.monotonic()
        self._pinged_at: float | None = None
        sock.settimeout(None)  # blocking, no poll() before each call; reads use MSG_DONTWAIT
        # The callers' instance is registered first: the kernel offers it each edge first.
        self._lead_poll = select.epoll()
        self._lead_poll.register(sock.fileno(), _EDGE)
        self._idle_poll = select.epoll()
        self._idle_poll.register(sock.fileno(), _EDGE)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the end, for the reader
        self._idle_poll.register(self._wake_fd, select.EPOLLIN)
        self.reader = threading.Thread(target=self._read, name="pbt-client-reader", daemon=True)

    def start(self) -> None:
        self.reader.start()

    # --- waiting --------------------------------------------------------------------------

    def enlist(self, me: Waiter, signal: Signal) -> None:
        """(session lock held) ``me`` is about to wait for ``signal``: take the leadership if
        nobody reads, else queue for it."""
        signal.add(me)
        self._seek(me, signal)

    def wait(
        self,
        me: Waiter,
        signal: Signal,
        deadline: float | None,
        task: TaskBase[Any] | None = None,
    ) -> bool:
        """Wait (after :meth:`enlist`) until ``signal`` is set or ``deadline`` passes (on
        the monotonic clock); read the socket while leading. ``task`` is what the caller
        waits for, decided as soon as its outcome is read (so no dispatcher wakes for it
        when it has no trigger). Return whether the signal is set."""
        lock = self._lock
        try:
            while True:
                with lock:
                    me.rearm()
                    if signal.is_set:
                        return True
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or self._over:
                        return False  # (once over, every signal the core knows of is set)
                    self._seek(me, signal)
                    leading = self._leader is me
                if leading:
                    self._lead(me, signal, deadline, task)
                else:
                    me.sleep(left)
        finally:
            with lock:
                self.withdraw(me, signal)

    def withdraw(self, me: Waiter, signal: Signal) -> None:
        """(session lock held) ``me`` waits no more: off the queue, the leadership passed on."""
        signal.discard(me)
        for index, (follower, _) in enumerate(self._followers):
            if follower is me:
                del self._followers[index]
                break
        if self._leader is me:
            self._release(me)
        me.rearm()

    def _seek(self, me: Waiter, signal: Signal) -> None:
        if self._over or self._leader is me:
            return
        if self._leader is None:
            self._leader = me
        elif not any(follower is me for follower, _ in self._followers):
            self._followers.append((me, signal))

    def _release(self, me: Waiter) -> None:
        """(session lock held) Hand the leadership to the first follower still waiting for
        its answer; with none, nobody leads and the reader thread's epoll hears what comes."""
        if self._leader is not me:
            return
        self._leader = None
        if self._missed and not self._over:
            # Let go without reading it (an exception, a promoted follower that left): the
            # reader thread reads it, unless the next leader does first.
            self._missed = False
            os.eventfd_write(self._wake_fd, 1)
        while self._followers:
            follower, signal = self._followers.popleft()
            if not signal.is_set:  # the answered ones were woken by their signal
                self._leader = follower
                follower.wake()
                return
        if self._closing:
            self._reader_waiter.wake()

    def _let_go(self, me: Waiter) -> bool:
        """(session lock held) Release the leadership, unless an edge was missed meanwhile
        (return False: read first, then try again)."""
        if self._missed and not self._over:
            self._missed = False
            return False
        self._release(me)
        return True

    def _lead(
        self, me: Waiter, signal: Signal, deadline: float | None, task: TaskBase[Any] | None
    ) -> None:
        """Read as a caller until its signal is set or its deadline passes."""
        lock = self._lock
        try:
            while True:
                now = time.monotonic()
                if signal.is_set or self._over or (deadline is not None and now >= deadline):
                    with lock:
                        if self._let_go(me):
                            return
                    self._drain(signal, task)
                    continue
                wait = self._quiet_for(now)
                if wait is not None and wait <= 0:
                    self._quiet(now)
                    continue
                if deadline is not None and (wait is None or deadline - now < wait):
                    wait = deadline - now
                if self._lead_poll.poll(wait):
                    self._drain(signal, task)
                else:
                    self._quiet(time.monotonic())
        finally:
            with lock:
                self._release(me)  # after an exception; a no-op once let go

    def _drain(self, signal: Signal | None, task: TaskBase[Any] | None) -> None:
        """Read and apply until the socket says it has nothing (EAGAIN): what comes later
        brings an edge of its own. (Not just until a short read: an end of stream that
        came with the last data brings no edge of its own.)"""
        while not self._over:
            try:
                data = self._sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as err:
                self.end(f"connection to {self._where} broke: {err}")
                return
            self._take(data, signal, task)

    def _take(self, data: bytes, signal: Signal | None, task: TaskBase[Any] | None) -> None:
        """Apply what was read; ``b""`` is the end of the stream."""
        if not data:
            pending = self._decoder.pending
            reason = None  # a clean end of stream
            if pending:
                reason = (
                    f"the connection ended inside a frame ({pending} bytes of it arrived):"
                    " truncated"
                )
            self.end(reason)
            return
        self._heard_at = time.monotonic()
        self._pinged_at = None
        core = self._core
        try:
            with self._lock:
                for message in self._decoder.feed(data):
                    core.receive(message)
                work = core.take_work()
                orphans = core.take_orphans()
        except ConnectionLost as err:
            self.end(err.text)
            return
        except ProtocolError as err:
            self.end(f"bad frame from the server: {err.text}")
            return
        self._deliver(work)
        for frame in orphans:
            self.send_quietly(frame)

    # --- keepalive --------------------------------------------------------------------------

    def _quiet_for(self, now: float) -> float | None:
        """Seconds until the quiet line needs a ping or is given up; None: never."""
        if self._keepalive is None:
            return None
        since = self._heard_at if self._pinged_at is None else self._pinged_at
        return since + self._keepalive - now

    def _quiet(self, now: float) -> None:
        keepalive = self._keepalive
        if keepalive is None:
            return
        if self._pinged_at is not None:
            if now >= self._pinged_at + keepalive:
                self.end(f"the server did not answer a keepalive ping within {keepalive} s")
            return
        if now < self._heard_at + keepalive:
            return
        self._pinged_at = now
        with self._lock:
            if self._core.ended:
                return
            _, frame = self._core.request("ping", {}, Signal())
        self.send_quietly(frame)

    # --- sending ----------------------------------------------------------------------------

    def send(self, frame: bytes, me: Waiter) -> None:
        """Send one whole frame for a caller that may be leading already (:meth:`enlist`);
        if it does not fit at once, the leadership is handed on before the rest is sent.

        Raises:
            OSError: the socket is broken (the caller ends the session).
        """
        with self._send_lock:
            try:
                sent = self._sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < len(frame):
                with self._lock:
                    if self._leader is me:
                        self._release(me)
                self._sock.sendall(memoryview(frame)[sent:])

    def send_quietly(self, frame: bytes) -> None:
        """A ping or a cancel, from whoever leads: never wait behind a caller stuck sending
        to a broker that does not read (the missing answer to a ping says as much)."""
        if self._send_lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):
                    self._sock.sendall(frame)
            finally:
                self._send_lock.release()

    # --- the end ----------------------------------------------------------------------------

    def end(self, reason: str | None) -> None:
        """The connection is over (``reason``; None: a clean end of stream): fail what is
        pending, wake every waiter and the reader thread, which closes the socket."""
        with self._lock:
            self._core.connection_lost(reason)  # a no-op after close()
            if not self._over:  # (once over, the reader thread may have closed the eventfd)
                self._over = True
                os.eventfd_write(self._wake_fd, 1)  # the reader thread, out of its epoll
            work = self._core.take_work()
            for follower, _ in self._followers:
                follower.wake()
            self._followers.clear()
        self._deliver(work)
        self.shutdown()  # ends a leader's recv and a sendall blocked on a peer that stopped reading

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):  # already closed by the reader thread
            self._sock.shutdown(socket.SHUT_RDWR)

    # --- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        me, lock = self._reader_waiter, self._lock
        reason: str | None = "the client's reader stopped"
        try:
            while not self._over:
                self._idle_once(me)
            reason = None
        except BaseException as err:  # a bug of ours: the session ends, it must not hang
            reason = f"the client's reader failed: {err!r}"
            raise
        finally:
            self.end(reason)  # no-op but for the waiters if it was over already
            # No caller may be inside recv when the socket is closed (its number could be
            # reused): they all let go once they see the end.
            while True:
                with lock:
                    me.rearm()
                    self._closing = True
                    if self._leader is None:
                        self._leader = me
                        break
                me.sleep(None)
            with self._send_lock:
                self._sock.close()
            self._lead_poll.close()
            self._idle_poll.close()
            os.close(self._wake_fd)
            self._finished()

    def _idle_once(self, me: Waiter) -> None:
        """Wait for what comes while no caller waits; read it if nobody leads."""
        wait = self._quiet_for(time.monotonic())
        events = self._idle_poll.poll(None if wait is None else max(wait, 0.0))
        data = False
        for fd, _ in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                data = True  # a leader that let go abnormally may have left something
            else:
                data = True
        with self._lock:
            if self._over:
                return
            if self._leader is not None:
                if data:
                    self._missed = True  # the caller leading reads it before it lets go
                return
            self._leader = me
        try:
            if data:
                self._drain(None, None)
            else:
                self._quiet(time.monotonic())
        finally:
            with self._lock:
                self._release(me)
