"""psycopg driven from Trio directly, and a small Trio connection pool.

psycopg's `AsyncConnection` does its I/O through generators that say which readiness of the
socket they wait for (`psycopg.waiting`); `AsyncConnection.wait` hands them to asyncio. Through
trio-asyncio that costs about 0.8 ms of CPU per statement on a small machine (every wait adds and
removes an asyncio reader, each a Trio task; the unit of work crosses the bridge twice), against
~0.15 ms when Trio waits on the socket itself. `TrioConnection.wait` does that when it runs in
Trio, and keeps psycopg's own asyncio path when it is awaited from asyncio (sniffio tells which),
so one connection serves both.

Connections are still made through the asyncio bridge (`psycopg`'s connect resolves names and
drives its own connection generator with asyncio): that is once per connection, not per query.
psycopg_pool is asyncio-only, hence `TrioPool`: a bounded set of connections handed out one unit
of work at a time. A connection goes back to the pool only when the unit ended normally and the
connection is idle and healthy; a unit that was cancelled (a deadline, the shutdown) or left the
connection in any other state closes it (libpq's finish: local, immediate), so nothing ever waits
for a stalled server, and the next unit opens a new one.
"""

from __future__ import annotations

import contextlib
import math
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import sniffio
import trio
from psycopg import errors as e
from psycopg import pq
from psycopg.abc import PQGen
from psycopg.waiting import Ready, Wait

RV = TypeVar("RV")

_READY_R = Ready.R
_READY_W = Ready.W
_WAIT_R = Wait.R
_WAIT_W = Wait.W
_POLL_MASK = {Wait.R: select.POLLIN, Wait.W: select.POLLOUT, Wait.RW: select.POLLIN | select.POLLOUT}


def _ready_now(fileno: int, s: int) -> int:
    """The socket's readiness for `s` right now (a zero-timeout poll: no event-loop round trip)."""
    p = select.poll()
    p.register(fileno, _POLL_MASK[Wait(s)])
    ready = 0
    for _, ev in p.poll(0):
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= _READY_R
        if ev & select.POLLOUT:
            ready |= _READY_W
    return ready


async def _wait_either(fileno: int) -> None:
    """Until the socket is readable or writable (libpq flushing a large message while the server
    may be sending results back: waiting for one side only could deadlock)."""
    async with trio.open_nursery() as nursery:

        async def side(wait: Callable[[int], Awaitable[None]]) -> None:
            await wait(fileno)
            nursery.cancel_scope.cancel()

        nursery.start_soon(side, trio.lowlevel.wait_readable)
        nursery.start_soon(side, trio.lowlevel.wait_writable)


async def trio_wait(gen: PQGen[RV], fileno: int, timeout: float | None = None) -> RV:  # noqa: ASYNC109 (psycopg semantics)
    """Drive a psycopg generator on `fileno` with Trio's I/O waits (psycopg.waiting.wait_async's
    contract: `_WaitTimeout` after `timeout` seconds, OperationalError if the socket is gone)."""
    try:
        s = next(gen)
    except StopIteration as ex:
        return ex.value  # type: ignore[no-any-return]
    deadline = math.inf if timeout is None else trio.current_time() + timeout
    try:
        while True:
            # A socket asked for writing is nearly always writable: a zero-timeout poll is much
            # cheaper than a round through the event loop (pipeline mode flushes at every command).
            ready = _ready_now(fileno, s) if s & _WAIT_W else 0
            if not ready:
                with trio.move_on_at(deadline):
                    if s == _WAIT_R:
                        await trio.lowlevel.wait_readable(fileno)
                        ready = _READY_R
                    elif s == _WAIT_W:
                        await trio.lowlevel.wait_writable(fileno)
                        ready = _READY_W
                    else:
                        await _wait_either(fileno)
                        ready = _ready_now(fileno, s)
                if not ready:
                    if trio.current_time() >= deadline:
                        raise e._WaitTimeout("wait timeout expired")
                    continue
            s = gen.send(ready)
    except OSError as ex:
        raise e.OperationalError("connection socket closed") from ex
    except StopIteration as ex:
        return ex.value  # type: ignore[no-any-return]


class TrioConnection(psycopg.AsyncConnection[Any]):
    """An AsyncConnection usable from Trio directly (and still from asyncio).

    Interrupted in asyncio (a cancelled bridged call), the query is abandoned: the connection is
    closed at once instead of psycopg's cancel request and wait (up to 5 s + 5 s against a
    stalled server). Interrupted in Trio (a wait cancelled), it is closed at once likewise."""

    async def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:  # noqa: ASYNC109
        if sniffio.current_async_library() == "trio":
            if self.pgconn.status == pq.ConnStatus.BAD:
                raise e.OperationalError("the connection is closed")
            try:
                return await trio_wait(gen, self.pgconn.socket, timeout)
            except trio.Cancelled:
                # Cut short mid-exchange, the connection's state is unknown: close it now (local,
                # immediate). psycopg's clean-up then sees a closed connection and lets the
                # cancellation through (a pipeline otherwise fails to leave pipeline mode with
                # results outstanding and raises that instead).
                self.pgconn.finish()
                raise
        return await super().wait(gen, interval, timeout)

    async def _try_cancel(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (psycopg signature)
        self.pgconn.finish()


class PoolTimeout(psycopg.OperationalError):
    """No connection of the pool became free in time."""


def reusable(conn: TrioConnection) -> bool:
    """May this connection serve the next unit of work?"""
    return (not conn.closed and conn.pgconn.status == pq.ConnStatus.OK
            and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE)


class TrioPool:
    """At most `max_size` connections, made on demand (and `min_size` at open) by `connect`."""

    def __init__(self, connect: Callable[[], Awaitable[TrioConnection]], *, max_size: int, min_size: int = 0,
                 timeout: float = 10.0) -> None:
        self.max_size = max_size
        self.min_size = min(min_size, max_size)
        self.timeout = timeout
        self._connect = connect
        self._slots = trio.Semaphore(max_size)
        self._idle: list[TrioConnection] = []
        self._closed = False

    async def open(self) -> None:
        """Open `min_size` connections (raises what connecting raised)."""
        self._closed = False
        while len(self._idle) < self.min_size:
            self._idle.append(await self._connect())

    def close(self) -> None:
        """Close the idle connections now; those in use are closed when their unit ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.pgconn.finish()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[TrioConnection]:
        if self._closed:
            raise PoolTimeout("the connection pool is closed")
        # A caller already cancelled stops here, before anything is sent; a free slot is then
        # taken without a trip through the run loop (the unit of work waits for the server anyway).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.timeout) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise PoolTimeout(f"no connection available within {self.timeout:g}s") from None
        try:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if reusable(candidate):
                    conn = candidate
                    break
                candidate.pgconn.finish()
            if conn is None:
                conn = await self._connect()
            done = False
            try:
                yield conn
                done = True
            finally:
                if done and not self._closed and reusable(conn):
                    self._idle.append(conn)
                else:
                    # Cancelled or failed mid-unit: its state is unknown; local close, no round trip.
                    conn.pgconn.finish()
        finally:
            self._slots.release()
