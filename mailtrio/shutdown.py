"""The one shutdown deadline, its sub-budgets, the signal handlers and the last-resort watchdog.

The first SIGTERM/SIGINT fixes the deadline `t0 + MAIL_SHUTDOWN_TIMEOUT`. Every bounded step of
the shutdown (HTTP drain, claim shield, give-back, recorder flush, clean-up writes, closing Redis
and PostgreSQL, the telemetry flush) takes its budget from it through `shielded()`, which never
reaches past the deadline (minus the step's reserve). A second signal cancels every such scope
and the whole run at once. A watchdog thread, independent of the event loop, ends the process
with exit 1 and one log line if it is still alive `WATCHDOG_GRACE` seconds after the deadline.

Layout of the budget T (D = t0 + T):

    t0                  listener stops accepting, consumer and scheduler stop claiming
    ... D - reserve     in-flight HTTP requests and attempts drain side by side
    ... D - close       clean-up writes of cancelled attempts, claims given back
    ... D               Redis and PostgreSQL closed (abandoned if they do not answer)
    ... D + 0.5 s       telemetry flushed (what is not exported by then is dropped)
    D + 2 s             watchdog: exit 1
"""

from __future__ import annotations

import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from mailtrio import log

_log = log.get("mailtrio.shutdown")

# The watchdog ends the process this long after the deadline.
WATCHDOG_GRACE = 2.0
# The telemetry flush may run until this long after the deadline.
FLUSH_GRACE = 0.5


def drain_reserve(timeout: float) -> float:
    """Time kept after the drain (HTTP requests, attempts) for clean-up writes and closing."""
    return min(3.0, timeout * 0.2)


def close_reserve(timeout: float) -> float:
    """Time kept after the clean-up writes for closing Redis and PostgreSQL."""
    return min(1.0, timeout * 0.1)


class Shutdown:
    """The shutdown deadline of one run. Before a request the deadline is infinite."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.requested = trio.Event()
        self.hurried = False
        # trio clock and time.monotonic() views of the deadline
        self.deadline = math.inf
        self.deadline_monotonic = math.inf
        # live bounded scopes and the reserve each keeps before the deadline
        self._scopes: dict[trio.CancelScope, float] = {}
        self._on_hurry: list[Callable[[], None]] = []

    # -- requests --------------------------------------------------------------------------------
    def request(self, *, signalled_at: float | None = None) -> None:
        """Fix the deadline (first request); a later request hurries."""
        if self.requested.is_set():
            self.hurry()
            return
        elapsed = 0.0 if signalled_at is None else max(0.0, time.monotonic() - signalled_at)
        self.deadline = trio.current_time() + self.timeout - elapsed
        self.deadline_monotonic = time.monotonic() + self.timeout - elapsed
        for scope, reserve in self._scopes.items():
            scope.deadline = self.cap(scope.deadline, reserve)
        self.requested.set()

    def hurry(self) -> None:
        """Cancel every bounded step and the run at once (a second signal)."""
        if not self.requested.is_set():
            self.request()
        self.hurried = True
        self.deadline = min(self.deadline, trio.current_time())
        for scope in list(self._scopes):
            scope.cancel()
        for callback in self._on_hurry:
            callback()

    def on_hurry(self, callback: Callable[[], None]) -> None:
        self._on_hurry.append(callback)

    # -- budgets ---------------------------------------------------------------------------------
    def cap(self, deadline: float, reserve: float = 0.0) -> float:
        """`deadline` (trio clock), never past the shutdown deadline minus `reserve`."""
        return min(deadline, self.deadline - reserve)

    @contextmanager
    def shielded(self, budget: float, *, reserve: float | None = None) -> Iterator[trio.CancelScope]:
        """A shielded cancel scope for a clean-up step: `budget` seconds, never past the deadline
        minus `reserve` (default: the close reserve), cancelled at once by a second signal."""
        if reserve is None:
            reserve = close_reserve(self.timeout)
        scope = trio.CancelScope(shield=True, deadline=self.cap(trio.current_time() + budget, reserve))
        if self.hurried:
            scope.cancel()
        self._scopes[scope] = reserve
        try:
            with scope:
                yield scope
        finally:
            self._scopes.pop(scope, None)

    def flush_budget(self, most: float) -> float:
        """Seconds (wall clock) the telemetry flush may take: `most`, and never past the deadline
        plus FLUSH_GRACE."""
        if self.hurried:
            return 0.2
        return max(0.0, min(most, self.deadline_monotonic + FLUSH_GRACE - time.monotonic()))


# The deadline of the running service; an infinite one until `install` (in-process tests).
current = Shutdown(math.inf)


def install(timeout: float) -> Shutdown:
    global current
    current = Shutdown(timeout)
    return current


def shielded(budget: float, *, reserve: float | None = None) -> Any:
    """`current.shielded(...)`: a clean-up step's shielded scope bounded by the one deadline."""
    return current.shielded(budget, reserve=reserve)


# -- signals and the watchdog -----------------------------------------------------------------------


class Watchdog:
    """A thread that ends the process `WATCHDOG_GRACE` s after the shutdown deadline.

    It does not depend on the event loop: the signal handler arms it by writing the deadline to a
    variable and one byte to a pipe, both safe from a signal handler."""

    def __init__(self, timeout: float, grace: float = WATCHDOG_GRACE) -> None:
        self.timeout = timeout
        self.grace = grace
        self.deadline = math.inf
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._watch, name="shutdown-watchdog", daemon=True)
        self._thread.start()

    def arm(self, signalled_at: float) -> None:
        if self.deadline == math.inf:
            self.deadline = signalled_at + self.timeout + self.grace
        try:
            os.write(self._write, b"\0")
        except OSError:
            pass

    def _watch(self) -> None:
        while True:
            wait = None if self.deadline == math.inf else max(0.0, self.deadline - time.monotonic())
            if wait == 0.0:
                break
            ready, _, _ = select.select([self._read], [], [], wait)
            if ready:
                os.read(self._read, 64)
        # Say so from a helper thread: a blocked stdout must not keep the process alive.
        line = threading.Thread(target=self._say, daemon=True)
        line.start()
        line.join(0.3)
        os._exit(1)

    def _say(self) -> None:
        _log.error("shutdown bound exceeded; exiting now", timeout_s=self.timeout,
                   exceeded_by_s=round(self.grace, 3))


@contextmanager
def signal_handlers(stop: Shutdown, watchdog: Watchdog | None) -> Iterator[None]:
    """Route SIGTERM/SIGINT to `stop` (first: the deadline, later: hurry) from inside trio.run.

    The handler itself only records the time, arms the watchdog and wakes Trio (all three safe in
    a signal handler), so the watchdog runs even if the event loop were stuck."""
    token = trio.lowlevel.current_trio_token()

    def on_signal(signum: int, signalled_at: float) -> None:
        name = signal.Signals(signum).name
        if stop.requested.is_set():
            _log.warning("second signal received; stopping at once", signal=name)
        else:
            _log.info("signal received", signal=name)
        stop.request(signalled_at=signalled_at)

    def handler(signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if watchdog is not None:
            watchdog.arm(now)
        token.run_sync_soon(on_signal, signum, now)

    def late_handler(_signum: int, _frame: Any) -> None:
        # After the run (the telemetry flush): a signal cuts the flush short, never kills.
        now = time.monotonic()
        if watchdog is not None:
            watchdog.arm(now)
        stop.hurried = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, late_handler)
