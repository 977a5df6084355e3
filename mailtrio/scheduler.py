"""The scheduler: claims due deliveries and hands them to the attempt workers (CONTRACT §5).

Claim ahead: claim due deliveries in one UPDATE over a `FOR UPDATE SKIP LOCKED` subselect
(authsession before notification, through the partial indexes on `deliveries (next_attempt_at)`),
render and store what is not rendered yet, and hand each to a worker over the unbuffered channel
(all the workers already waiting take theirs in one step, not one scheduler turn apart).
A claim sets status `sending` and a lease (owner MAIL_INSTANCE_ID, expiry MAIL_SMTP_TIMEOUT +
15 s). Claims are made not only for idle workers but also for a small buffer ahead of them
(CLAIM_AHEAD_PER_WORKER jobs per worker): claimed, rendered jobs whose claim task waits in
`send_channel.send` until a worker takes them, so a worker that finishes finds its next job
waiting while the next claim and render overlap the sending. The buffer is bounded (at most
`ahead` jobs held beyond the busy workers, claims in flight included), first in first out, and
small: an authsession delivery claimed next waits behind at most about one attempt per worker.
Every buffered job is under its lease, whose time in the buffer counts (the worker's send window
is measured from before the claim): a job waits in the buffer only until its send window would
fall below MIN_SEND_SECONDS, and is then given back unsent (so would the worker that took it).
A claim for an idle worker with nothing buffered starts at once; further claims wait until at
least a share of the window (half the pool) is free, so that under load claims stay large; a
second claim may overlap the first so that commits overlap.

When nothing more is due the loop sleeps until the first of: a NOTIFY on `mail_schedule` (intake
commits, deliveries put back), the earliest future `next_attempt_at` (so scheduled sends and
retries fire on time), a retry this instance just scheduled, or the bounded poll interval.

Lease rescue runs beside it: deliveries whose lease expired and whose owner is provably gone
(no session holds its instance identity lock, see mailtrio.identity) go back on the schedule with
the unfinished attempt recorded `interrupted`; SKIP LOCKED makes exactly one instance rescue each.
At startup, once this process holds its own identity lock (which proves a previous run under the
same MAIL_INSTANCE_ID gone) and before the first claim, leases still held under its id are
rescued the same way at once. The MAIL_MAX_INTERRUPTED-th interrupted attempt in a row
dead-letters the delivery (`repeatedly interrupted`) instead of putting it back.

While the identity lock is not known held (its connection broke), nothing is claimed. Each claim
reads the local monotonic clock before its statement is sent: the lease ends, by that clock, at
most MAIL_SMTP_TIMEOUT + 15 s later, never after the database's expiry (see workers). Cancelled
(shutdown), the scheduler stops claiming, gives back at once every job still in the buffer (the
claim tasks blocked in `send_channel.send` are cancelled: a job is either taken by a worker or
given back, never both) and closes the channel so the workers drain.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import trio

from mailtrio import log, shutdown, telemetry
from mailtrio.backoff import Backoff
from mailtrio.config import Settings
from mailtrio.enums import AttemptStatus, DeliveryStatus
from mailtrio.store import Conn, Database, close_quietly
from mailtrio.store import engine as store
from mailtrio.workers import LEASE_MARGIN, MIN_SEND_SECONDS, Job, Prepared, WorkerPool, release

if TYPE_CHECKING:
    from mailtrio.identity import InstanceIdentity

_log = log.get("mailtrio.scheduler")

POLL_INTERVAL = 1.0
RESCUE_INTERVAL = 2.0
ACTIVITY_LOG_INTERVAL = 60.0
# Upper bound on one claim (the pool size bounds it first).
MAX_CLAIM = 500
# Claims in flight at once: each one's commit waits for a WAL flush; overlapping them lets one
# flush serve several (PostgreSQL's group commit) while workers keep turning over.
CONCURRENT_CLAIMS = 2
# Claimed, rendered jobs held ahead of the workers, per worker: a finishing worker finds its next
# job waiting. Small, so that an authsession delivery claimed behind the buffer waits about one
# attempt at most.
CLAIM_AHEAD_PER_WORKER = 1
# Bound on one scheduler query.
QUERY_TIMEOUT = 15.0
# A claim is shielded from cancellation (so a claim that committed is never lost to a shutdown,
# which would leave its rows waiting for lease expiry), within this bound; never more than a
# quarter of MAIL_SHUTDOWN_TIMEOUT, so a stalled claim cannot stretch the shutdown past its bound.
CLAIM_TIMEOUT = 5.0
# After a database error, wait about this long (doubling up to the cap, jittered: mailtrio.backoff)
# before trying again; the cap keeps claims resuming within seconds of PostgreSQL's return, whatever
# the outage's length.
ERROR_BACKOFF = (0.2, 2.0)
# Never sleep less than this between claim rounds that found nothing claimable.
MIN_SLEEP = 0.01
LISTEN_WAIT = 30.0


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        send_channel: trio.MemorySendChannel[Job],
        pool: WorkerPool,
        *,
        identity: InstanceIdentity | None = None,
    ) -> None:
        self.settings = settings
        # Claims stop while the instance identity lock is not known held.
        self.identity = identity
        self.db = db
        self.send_channel = send_channel
        self.pool = pool
        self.owner = settings.instance_id
        self.claim_timeout = min(CLAIM_TIMEOUT, settings.shutdown_timeout / 4)
        self._wake = trio.Event()
        self._listening = False
        pool.on_retry_scheduled = self._retry_scheduled
        # claim bookkeeping: jobs that claims in flight may bring (their limits), claim statements
        # in flight, claimed jobs not taken by a worker yet (the buffer)
        self.ahead = CLAIM_AHEAD_PER_WORKER * pool.size
        self._capacity = trio.Event()
        self._claiming = 0
        self._inflight = 0
        self.buffered = 0
        self._drained = False
        self._error = False
        self._claim_ok = False
        pool.on_idle_change = self._capacity_changed
        # running totals (the activity line logs their increments)
        self.claimed = 0
        self.rescued = 0
        self.released = 0
        self.render_failures = 0
        # seconds until the next delivery is due, as read with the last claim (None: none waits)
        self.next_wait: float | None = None

    # -- wake-ups ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Something may be due: run a claim round now."""
        self._wake.set()

    def _retry_scheduled(self, delay: float) -> None:
        # Retries due sooner than the next poll re-arm the precise timer.
        if delay < POLL_INTERVAL:
            self.wake()

    # -- service -------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with self.send_channel, trio.open_nursery() as nursery:
                await self._rescue_previous_run()
                await nursery.start(self._listen)
                nursery.start_soon(self._rescue_loop)
                nursery.start_soon(self._activity_loop)
                _log.info(
                    "scheduler started",
                    instance_id=self.owner,
                    lease_s=self.settings.lease_seconds,
                    claim_ahead=self.ahead,
                    poll_interval_s=POLL_INTERVAL,
                    listening=self._listening,
                )
                task_status.started()
                await self._claim_loop()
        finally:
            _log.info("scheduler stopped", claimed=self.claimed, rescued=self.rescued, released=self.released)

    async def run_once(self, limit: int | None = None) -> dict[str, int]:
        """One rescue and one claim round for `limit` (default: idle workers); returns counts."""
        rescued = await self.rescue_once()
        n = limit if limit is not None else self.pool.idle
        jobs = await self.claim(n) if n > 0 else []
        await self._dispatch(jobs)
        return {"rescued": rescued, "claimed": len(jobs)}

    # -- claiming -------------------------------------------------------------------------------------
    async def claim(self, limit: int) -> list[Job]:
        """Claim up to `limit` due deliveries, rendered and stored right after (store.claim_batch)."""
        jobs, _ = await self._claim(limit)
        return jobs

    async def _claim(self, limit: int) -> tuple[list[Job], bool]:
        """The claimed jobs, and whether the claim came back short (nothing more is due now)."""
        limit = max(0, min(limit, MAX_CLAIM))
        if limit == 0:
            return [], False
        if self.identity is not None and not self.identity.holds():
            return [], False
        # The lease's start on the local monotonic clock: read before the statement is sent, so
        # the lease never ends later by this clock than by the database's.
        lease_start = trio.current_time()
        owner, lease = self.owner, self.settings.lease_seconds
        prepare = functools.partial(self.pool.prepare_claims, lease_start=lease_start)

        async def _run(conn: Conn) -> tuple[Prepared, float | None]:
            return await store.claim_batch(conn, owner=owner, lease_seconds=lease, limit=limit, prepare=prepare)

        # Shielded within claim_timeout, and never past the shutdown deadline's clean-up reserve.
        with shutdown.shielded(self.claim_timeout) as scope:
            prepared, self.next_wait = await self.db.run(_run)
        if scope.cancelled_caught:
            raise trio.TooSlowError(f"claim did not finish within {self.claim_timeout:g}s")
        claimed = len(prepared.jobs) + len(prepared.failures)
        self.claimed += claimed
        self.render_failures += len(prepared.failures)
        jobs = prepared.sendable()
        # Held from now until their outcome is written (a claim that failed halfway holds
        # nothing: its leases expire and this instance's own rescue takes them back).
        self.pool.held.update(job.claim.delivery_id for job in jobs)
        return jobs, claimed < limit

    def _capacity_changed(self) -> None:
        self._capacity.set()

    def _idle(self) -> int:
        """Workers waiting for a job now. The channel's own count: a worker handed a job leaves
        it in the same step (the pool's idle count follows only when that worker runs again)."""
        return self.send_channel.statistics().tasks_waiting_receive

    def available(self) -> int:
        """Jobs a claim may bring now: idle workers plus the buffer ahead of them, less what is
        buffered already and what claims in flight may bring."""
        return min(self._idle() + self.ahead - self.buffered - self._claiming, MAX_CLAIM)

    async def _wait_capacity(self) -> int:
        """Wait until free room in the window (idle workers and the buffer ahead of them)
        justifies a claim.

        A worker idle with nothing buffered or coming for it: claim at once (lowest latency).
        Otherwise claim when at least a share of the pool is free, so that under load claims stay
        large (every claim costs a commit; large claims keep that cost per delivery small), with
        at most CONCURRENT_CLAIMS claim statements in flight.
        """
        share = max(1, self.pool.size // CONCURRENT_CLAIMS)
        while True:
            available = self.available()
            if available > 0 and self._inflight < CONCURRENT_CLAIMS:
                starving = self._idle() > self.buffered + self._claiming
                if starving or available >= share:
                    return available
            await self._capacity.wait()
            self._capacity = trio.Event()

    async def _claim_loop(self) -> None:
        """Start claims while the window has room, up to CONCURRENT_CLAIMS at once (their commits
        overlap); when a claim comes back short, the schedule is drained: sleep until woken or
        due."""
        backoff = Backoff(*ERROR_BACKOFF)
        async with trio.open_nursery() as nursery:
            while True:
                available = await self._wait_capacity()
                identity = self.identity
                if identity is not None and not identity.holds():
                    # Not provably the only process with this id: claim nothing until it is.
                    with trio.move_on_after(POLL_INTERVAL):
                        await identity.changed.wait()
                    continue
                if self._error:
                    self._error = False
                    await trio.sleep(backoff.next())
                    continue
                if self._claim_ok:
                    self._claim_ok = False
                    backoff.reset()
                if self._drained:
                    # The last claim came back short and read when the next delivery falls due.
                    wait = self.next_wait
                    timeout = POLL_INTERVAL if wait is None else min(POLL_INTERVAL, max(wait, MIN_SLEEP))
                    with trio.move_on_after(timeout):
                        await self._wake.wait()
                    self._drained = False
                    continue
                # Reset before claiming: a wake-up that arrives during the claim is kept.
                self._wake = trio.Event()
                self._claiming += available
                self._inflight += 1
                nursery.start_soon(self._claim_and_dispatch, available)
                # Let the claim start before considering another one.
                await trio.lowlevel.checkpoint()

    async def _claim_and_dispatch(self, limit: int) -> None:
        """One claim, then its jobs into the buffer: each waits in `send_channel.send` until a
        worker takes it. Cancelled (shutdown), whatever no worker took is given back at once."""
        try:
            try:
                jobs, short = await self._claim(limit)
            finally:
                self._claiming -= limit
                self._inflight -= 1
                self._capacity.set()
            self._claim_ok = True
            if short:
                self._drained = True
            self.buffered += len(jobs)
            handed = 0
            try:
                for job in jobs:
                    # A job waits in the buffer only while a worker could still send it (the
                    # worker's own check gives it back past the same point).
                    last = job.lease_end - LEASE_MARGIN - MIN_SEND_SECONDS
                    if trio.current_time() < last and self._hand_over(job):
                        handed += 1
                        continue
                    with trio.move_on_at(last):
                        await self.send_channel.send(job)
                        handed += 1
                        self.buffered -= 1
                        self._capacity.set()
                        continue
                    # The rest of this claim shares its lease: it ran short in the buffer.
                    _log.warning("claims given back: the lease ran short in the buffer",
                                 count=len(jobs) - handed, buffered_s=round(trio.current_time() - job.claimed_at, 3))
                    break
            finally:
                if handed < len(jobs):
                    self.buffered -= len(jobs) - handed
                    self._capacity.set()
                    await self._give_back(jobs[handed:])
        except Exception as exc:
            _log.warning("scheduler claim failed", error=_one_line(exc))
            self._error = True

    def _hand_over(self, job: Job) -> bool:
        """Give `job` to a worker waiting for one, without yielding; False when none waits.

        `await send_channel.send` yields to the scheduler after every job it hands over, so a
        claim's jobs would reach idle workers one loop turn apart (with sixteen workers and the
        intake on the loop, ~0.3-1 ms each): measured, workers sat idle beside a full buffer.
        """
        try:
            self.send_channel.send_nowait(job)
        except trio.WouldBlock:
            return False
        self.buffered -= 1
        self._capacity.set()
        return True

    async def _dispatch(self, jobs: list[Job]) -> None:
        handed = 0
        try:
            for job in jobs:
                await self.send_channel.send(job)
                handed += 1
        finally:
            if handed < len(jobs):
                await self._give_back(jobs[handed:])

    async def _give_back(self, jobs: list[Job]) -> None:
        """Release claims that never reached a worker (shielded, bounded)."""
        for job in jobs:
            job.span.set_attribute("mail.given_back", True)
            job.span.end()
        with shutdown.shielded(3.0):
            finishes = [release(job.claim, job.content.locale) for job in jobs]
            try:
                done = await self.pool.recorder.write_now(finishes)
                self.released += len(done)
                _log.info("claims given back", count=len(done), delivery_ids=sorted(done)[:50])
            except Exception as exc:
                _log.error("could not give claims back; their leases will expire",
                           count=len(jobs), error=_one_line(exc))

    # -- lease rescue --------------------------------------------------------------------------------
    def _rescued(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Count and report rescued deliveries; returns those dead-lettered."""
        self.rescued += len(rows)
        telemetry.attempt_outcomes.add(len(rows), {"status": str(AttemptStatus.INTERRUPTED)})
        dead = [r for r in rows if r.get("status") == DeliveryStatus.DEAD_LETTER]
        if dead:
            telemetry.dead_letters.add(len(dead))
            _log.warning(
                "deliveries dead-lettered: repeatedly interrupted",
                count=len(dead),
                max_interrupted=self.settings.max_interrupted,
                delivery_ids=[r["delivery_id"] for r in dead][:50],
            )
        return dead

    async def rescue_once(self) -> int:
        rescuer, most = self.owner, self.settings.max_interrupted
        held = sorted(self.pool.held)

        async def _rescue(conn: Conn) -> list[dict[str, object]]:
            return await store.rescue_expired(conn, rescuer=rescuer, max_interrupted=most, held=held)

        with trio.fail_after(QUERY_TIMEOUT):
            rows = await self.db.run(_rescue)
        if rows:
            self._rescued(rows)
            _log.warning(
                "expired leases rescued; deliveries back on the schedule",
                count=len(rows),
                delivery_ids=[r["delivery_id"] for r in rows][:50],
                lease_owners=sorted({str(r["instance_id"]) for r in rows}),
            )
            self.wake()
        return len(rows)

    async def _rescue_previous_run(self) -> None:
        """Before the first claim (and after the identity lock was taken, which proves a previous
        run under this MAIL_INSTANCE_ID gone): what that run left `sending` (it was killed
        mid-attempt) goes back on the schedule now rather than at lease expiry."""
        owner, most = self.owner, self.settings.max_interrupted

        async def _rescue(conn: Conn) -> list[dict[str, object]]:
            return await store.rescue_own_leases(conn, owner=owner, max_interrupted=most)

        rows: list[dict[str, object]] = []
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                for _ in range(100):  # batches of 500: far more than one instance ever holds
                    batch = await self.db.run(_rescue)
                    rows += batch
                    if len(batch) < 500:
                        break
        except Exception as exc:
            _log.warning("could not rescue the leases of a previous run; they will expire",
                         error=_one_line(exc))
            return
        if rows:
            self._rescued(rows)
            _log.warning(
                "leases of a previous run of this instance rescued; deliveries back on the schedule",
                count=len(rows),
                delivery_ids=[r["delivery_id"] for r in rows][:50],
            )

    async def _rescue_loop(self) -> None:
        while True:
            try:
                await self.rescue_once()
            except Exception as exc:
                _log.warning("lease rescue failed", error=_one_line(exc))
            await trio.sleep(RESCUE_INTERVAL)

    # -- LISTEN mail_schedule --------------------------------------------------------------------
    async def _listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = Backoff(*ERROR_BACKOFF)
        while True:
            conn: Conn | None = None
            try:
                conn = await self.db.connect_direct()
                listen_conn = conn
                with trio.fail_after(QUERY_TIMEOUT):
                    await store.listen_schedule(listen_conn)
                if started:
                    _log.info("schedule listener reconnected")
                self._listening = True
                backoff.reset()
                self.wake()  # anything notified while we were not listening
                if not started:
                    started = True
                    task_status.started()
                while True:
                    if await store.wait_schedule_notify(listen_conn, LISTEN_WAIT):
                        self.wake()
            except Exception as exc:
                self._listening = False
                delay = backoff.next()
                _log.warning("schedule listener lost; polling until it reconnects",
                             error=_one_line(exc), retry_in_s=round(delay, 3))
            finally:
                if conn is not None:
                    await close_quietly(conn)
            if not started:
                # Start anyway: the bounded poll keeps the schedule moving without notifications.
                started = True
                task_status.started()
            await trio.sleep(delay)

    # -- regular activity line ------------------------------------------------------------------
    async def _activity_loop(self) -> None:
        last = (0, 0, 0)
        while True:
            await trio.sleep(ACTIVITY_LOG_INTERVAL)
            now = (self.claimed, self.rescued, self.released)
            _log.info(
                "scheduler activity",
                claimed=now[0] - last[0],
                rescued=now[1] - last[1],
                released=now[2] - last[2],
                interval_s=ACTIVITY_LOG_INTERVAL,
                idle_workers=self.pool.idle,
                buffered=self.buffered,
                listening=self._listening,
            )
            last = now


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
