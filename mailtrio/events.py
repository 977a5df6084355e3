"""The event publisher: moves delivery events from the PostgreSQL outbox to the Redis stream.

Triggers write every event into `mail.delivery_events` in the transaction of the change it
describes (sql/00008_delivery_events.sql, sql/00009_delivery_events_cost.sql); intake and
delivery never wait for this component.
One instance publishes at a time: the one holding a session-level advisory lock on a connection
of its own, through which it also reads and marks the outbox. The others try again every
`lock_retry` seconds (±25%), so when the publisher dies (its connection closes, the lock goes
with it) another one takes over within seconds.

The active publisher reads the oldest unpublished events in outbox order, XADDs them in one
round trip (each entry carries its stable `event_id`; see Stream.add_json_batch), then marks
them published.
Delivery is at least once: a crash between the XADD and the mark publishes the batch again with
the same `event_id`s, which consumers dedupe. When Redis is down the batch is retried with a
backoff (mailtrio.backoff) while the events accumulate in the outbox; they drain in order when it
returns.

Every instance, publishing or not, refreshes the outbox gauges (`mail.events.outbox.depth`,
`mail.events.outbox.oldest_age_ms`) every few seconds.

Shutdown: the publisher keeps publishing while the attempt workers drain, so their final events
go out; `stop(within=...)` then lets it publish what is left for at most that long (its share of
MAIL_SHUTDOWN_TIMEOUT). Whatever remains stays in the outbox for the next publisher.
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from mailtrio import log, telemetry
from mailtrio.backoff import Backoff
from mailtrio.config import Settings
from mailtrio.store import Database
from mailtrio.store.events import OutboxConnection, outbox_gauges
from mailtrio.stream import Stream, StreamError

_log = log.get("mailtrio.events")

# Events per outbox read and per XADD round trip (one script call).
BATCH_SIZE = 500
# Pause between outbox reads when the outbox is drained.
POLL_INTERVAL = 0.2
# How often an instance that is not the publisher tries to take over (and, when PostgreSQL cannot
# be reached, to connect again), jittered ±25% (mailtrio.backoff with a constant step) so that
# instances started together do not poll in lockstep.
LOCK_RETRY = 2.0
# Backoff after a failed batch (Redis or PostgreSQL unreachable): mailtrio.backoff from the first
# delay, doubling up to the cap.
BACKOFF_MIN = 0.25
BACKOFF_MAX = 5.0
# The outbox gauges' refresh interval.
MONITOR_INTERVAL = 5.0
MONITOR_TIMEOUT = 10.0


class _RedisUnavailable(Exception):
    """The XADD batch failed: the events stay unpublished in the outbox."""


class Publisher:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        batch_size: int = BATCH_SIZE,
        poll_interval: float = POLL_INTERVAL,
        lock_retry: float = LOCK_RETRY,
        monitor_interval: float = MONITOR_INTERVAL,
    ) -> None:
        self.settings = settings
        self.db = db
        self.enabled = settings.events_publisher
        self.key = settings.event_stream
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lock_retry = lock_retry
        self.monitor_interval = monitor_interval
        # its own Redis client: a reset after a failure never touches the command consumer's
        self.stream = Stream(settings)
        self.outbox = OutboxConnection(db)
        # holding the publisher lock
        self.active = False
        self.published = 0
        self._stopping = trio.Event()
        self._scope = trio.CancelScope()

    # -- one batch ---------------------------------------------------------------------------------
    def _min_id(self) -> str | None:
        max_age = self.settings.event_stream_max_age
        if max_age <= 0:
            return None
        return f"{max(0, int((time.time() - max_age) * 1000))}-0"

    async def publish_once(self) -> int:
        """Publish the oldest unpublished events (at most one batch); returns how many.

        Only the instance holding the publisher lock may call this."""
        events = await self.outbox.fetch(self.batch_size)
        if not events:
            return 0
        try:
            await self.stream.add_json_batch(
                self.key,
                [e.entry for e in events],
                maxlen=self.settings.event_stream_maxlen or None,
                min_id=self._min_id(),
            )
        except StreamError as exc:
            raise _RedisUnavailable(_one_line(exc)) from exc
        await self.outbox.mark_published([e.seq for e in events])
        self.published += len(events)
        for name, n in Counter(e.event for e in events).items():
            telemetry.events_published.add(n, {"event": name})
        return len(events)

    # -- service -----------------------------------------------------------------------------------
    def stop(self, *, within: float) -> None:
        """Publish what is left for at most `within` seconds, then return from `run`."""
        self._stopping.set()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + max(0.0, within))

    def cancel(self) -> None:
        """Stop at once (a second shutdown signal): what is unpublished waits in the outbox."""
        self._stopping.set()
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _log.info(
            "event publisher started",
            stream=self.key,
            enabled=self.enabled,
            maxlen=self.settings.event_stream_maxlen,
            max_age_s=self.settings.event_stream_max_age,
        )
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._monitor)
                    task_status.started()
                    if self.enabled:
                        await self._publish_loop()
                    else:
                        await self._stopping.wait()
                    nursery.cancel_scope.cancel()
        finally:
            was_active = self.active
            self.active = False
            with trio.CancelScope(shield=True):
                await self.outbox.close(within=1.0)
                await self.stream.close(within=1.0)
            _log.info("event publisher stopped", published=self.published, was_publishing=was_active,
                      deadline_reached=self._scope.cancelled_caught)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        with trio.move_on_after(seconds):
            await self._stopping.wait()

    async def _publish_loop(self) -> None:
        failing = False
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        lock_poll = Backoff(self.lock_retry, self.lock_retry)
        while True:
            if not self.active:
                if self._stopping.is_set():
                    return
                try:
                    self.active = await self.outbox.try_lock()
                except Exception as exc:
                    await self.outbox.close()
                    if not failing:
                        _log.warning("event publisher cannot reach PostgreSQL", error=_one_line(exc))
                    failing = True
                    await self._pause(lock_poll.next())
                    continue
                if not self.active:
                    # another instance publishes; keep the connection and try again later
                    await self._pause(lock_poll.next())
                    continue
                _log.info("event publisher active", instance_id=self.settings.instance_id, stream=self.key)
            # the final drain: a read that began after stop() was called found the outbox empty
            drained_if_short = self._stopping.is_set()
            try:
                n = await self.publish_once()
            except _RedisUnavailable as exc:
                if not failing:
                    _log.warning("event publish failed; events wait in the outbox", error=str(exc))
                failing = True
                await self.stream.reset()
                if self._stopping.is_set():
                    return
                await self._pause(backoff.next())
                continue
            except Exception as exc:
                # PostgreSQL: the lock may be gone with the connection; give it up and start over
                if not failing:
                    _log.warning("event publisher lost its PostgreSQL connection; lock released",
                                 error=_one_line(exc))
                failing = True
                self.active = False
                await self.outbox.close()
                if self._stopping.is_set():
                    return
                await self._pause(backoff.next())
                continue
            if failing:
                _log.info("event publisher recovered")
                failing = False
                backoff.reset()
            if n < self.batch_size:
                if drained_if_short:
                    return
                await self._pause(self.poll_interval)

    async def refresh_gauges(self) -> telemetry.QueueSnapshot:
        """One refresh of the outbox gauges (the monitor's `run_once`)."""
        with trio.fail_after(MONITOR_TIMEOUT):
            depth, oldest_age_ms = await outbox_gauges(self.db)
        telemetry.outbox_snapshot.depth = depth
        telemetry.outbox_snapshot.oldest_age_ms = float(oldest_age_ms)
        return telemetry.outbox_snapshot

    async def _monitor(self) -> None:
        failing = False
        while True:
            started = trio.current_time()
            try:
                await self.refresh_gauges()
                failing = False
            except Exception as exc:
                if not failing:
                    _log.warning("event outbox gauges refresh failed", error=_one_line(exc))
                failing = True
            # a huge backlog slows the count: never spend more than ~5% of the time on it
            await trio.sleep(max(self.monitor_interval, 20 * (trio.current_time() - started)))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: " + " ".join(text.split())


