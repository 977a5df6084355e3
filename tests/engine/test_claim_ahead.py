"""Claim ahead, in-process against a real database and SMTP server: the scheduler keeps a bounded
buffer of claimed, rendered jobs ahead of busy workers; cancelled (shutdown), it gives the
buffered jobs back at once while the attempts in flight finish; a job whose lease ran short while
it waited in the buffer is given back unsent and sent later, exactly once; and through `mailtrio
serve`, SIGTERM gives the buffered jobs back before the attempts in flight have finished."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import trio
import trio.testing

from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.providers.build import build_provider
from mailtrio.scheduler import CLAIM_AHEAD_PER_WORKER, Scheduler
from mailtrio.store import Database
from mailtrio.workers import LEASE_MARGIN, MIN_SEND_SECONDS, Job, WorkerPool
from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.engine.test_engine_inprocess import poll
from tests.support.serve import TEMPLATES, ServeProcess
from tests.support.smtpserver import SmtpTestServer


def sending_ids(dsn: str) -> set[str]:
    return {r["delivery_id"] for r in h.query(dsn, "SELECT delivery_id FROM mail.deliveries WHERE status = 'sending'")}


def engine(settings: Settings, db: Database) -> Scheduler:
    """A scheduler and its worker pool (`.pool`) as the service wires them: an unbuffered job
    channel between the two."""
    send, receive = trio.open_memory_channel[Job](0)
    pool = WorkerPool(settings, db, Catalog.load(TEMPLATES, "en"), build_provider(settings), receive)
    return Scheduler(settings, db, send, pool)


async def test_the_buffer_is_bounded_and_given_back_at_once_when_cancelled(
    db: Database, database: str, service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    # Every transaction waits 4 s before RCPT is answered: both workers stay busy meanwhile.
    server = smtp_factory(rules=[{"match": "@example\\.com$", "action": "slow_rcpt", "delay_s": 4}])
    settings = Settings.from_env(smtp_env(service_env, server, MAIL_ATTEMPT_WORKER_CONCURRENCY="2",
                                          MAIL_SMTP_TIMEOUT="20s"))
    ids = h.insert(database, [h.delivery(f"n{i}") for i in range(10)])
    scheduler = engine(settings, db)
    pool = scheduler.pool
    ahead = CLAIM_AHEAD_PER_WORKER * 2
    assert scheduler.ahead == ahead
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            async with trio.open_nursery() as feeders:
                await feeders.start(scheduler.run)
                # Both workers in a transaction, `ahead` jobs claimed, rendered and waiting.
                await poll(lambda: pool.idle == 0 and scheduler.buffered == ahead, within=20)
                held = sending_ids(database)
                assert len(held) == 2 + ahead
                stored = h.query(database, "SELECT delivery_id FROM mail.payloads WHERE rendered_at IS NOT NULL")
                assert held <= {r["delivery_id"] for r in stored}  # rendered and stored under the lease
                await trio.sleep(0.5)
                assert sending_ids(database) == held  # bounded: nothing more is claimed
                feeders.cancel_scope.cancel()
            # The scheduler has returned: what no worker took is back on the schedule already,
            # while the two attempts in flight are still inside the server's wait.
            assert scheduler.released == ahead and scheduler.buffered == 0
            counts = h.status_counts(database)
            assert counts == {"sending": 2, "rendered": ahead, "queued": 8 - ahead}, counts
            given_back = held - sending_ids(database)
            assert len(given_back) == ahead
            for delivery_id, row in h.deliveries(database, sorted(given_back)).items():
                assert row["status"] == "rendered" and row["lease_owner"] is None and row["attempt_count"] == 0
                assert h.attempts(database, delivery_id) == []
        # the pool drained: the two attempts in flight were sent and recorded
    assert h.status_counts(database) == {"sent": 2, "rendered": ahead, "queued": 8 - ahead}
    sent = {r["message_id"] for r in h.deliveries(database, ids).values() if r["status"] == "sent"}
    assert set(server.accepted_by_message_id()) == sent


class ShortLease(Settings):
    """Settings whose lease is short enough for a buffered job to run out of send window."""

    @property
    def lease_seconds(self) -> float:
        return LEASE_MARGIN + 3.0


async def test_a_job_whose_lease_ran_short_in_the_buffer_is_given_back_unsent(
    db: Database, database: str, service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer],
) -> None:
    # The first transaction waits 2.4 s before RCPT: the job buffered behind it would have less
    # than MIN_SEND_SECONDS of its 3 s send window left when the only worker is free again, so
    # it leaves the buffer unsent when its window reaches that point.
    server = smtp_factory(rules=[{"match": "^slow@", "action": "slow_rcpt", "delay_s": 2.4, "times": 1}])
    base = Settings.from_env(smtp_env(service_env, server, MAIL_ATTEMPT_WORKER_CONCURRENCY="1",
                                      MAIL_SMTP_TIMEOUT="10s"))
    settings = ShortLease(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    assert settings.lease_seconds == LEASE_MARGIN + 3.0
    h.insert(database, [h.delivery("slow", to=["slow@example.com"], delay_s=-10)])
    h.insert(database, [h.delivery("next", delay_s=-5)])
    h.insert(database, [h.delivery("last", delay_s=-1)])
    ids = ["slow", "next", "last"]
    scheduler = engine(settings, db)
    pool = scheduler.pool
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            async with trio.open_nursery() as feeders:
                await feeders.start(scheduler.run)
                await poll(lambda: all(r["status"] in h.TERMINAL for r in h.deliveries(database, ids).values()),
                            within=40)
                feeders.cancel_scope.cancel()
    rows = h.deliveries(database, ids)
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert scheduler.released >= 1
    # given back unsent: no attempt counted for it, then sent once on a fresh claim
    assert [a["status"] for a in h.attempts(database, "next")] == ["provider_accepted"]
    accepted = server.accepted_by_message_id()
    assert sorted(len(accepted[rows[i]["message_id"]]) for i in ids) == [1, 1, 1]


async def _receivers(scheduler: Scheduler, count: int, nursery: trio.Nursery) -> list[tuple[str, int]]:
    """`count` tasks standing in for idle workers: each takes one job and notes how many jobs the
    scheduler had handed over (left its buffer) by the time that task ran again."""
    got: list[tuple[str, int]] = []
    claimed_before = scheduler.claimed

    async def one() -> None:
        job = await scheduler.pool.receive_channel.receive()
        handed = scheduler.claimed - claimed_before - scheduler.buffered
        got.append((job.claim.delivery_id, handed))
        job.span.end()

    for _ in range(count):
        nursery.start_soon(one)
    await trio.testing.wait_all_tasks_blocked()
    assert scheduler._idle() == count
    return got


async def test_a_claim_reaches_every_waiting_worker_in_one_step(
    db: Database, database: str, service_env: dict[str, str]
) -> None:
    """With workers waiting, a claim's jobs are all handed over before any of those workers runs:
    none waits a scheduler turn per job ahead of it (each such turn is a pass over every task
    the service runs)."""
    settings = Settings.from_env({**service_env, "MAIL_ATTEMPT_WORKER_CONCURRENCY": "6"})
    ids = h.insert(database, [h.delivery(f"w{i}") for i in range(6)])
    scheduler = engine(settings, db)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            got = await _receivers(scheduler, 6, nursery)
            await scheduler._claim_and_dispatch(6)
    assert sorted(d for d, _ in got) == sorted(ids)
    assert [handed for _, handed in got] == [6] * 6, got
    assert scheduler.buffered == 0 and scheduler.released == 0
    assert h.status_counts(database) == {"sending": 6}


class NoWindow(Settings):
    """Settings whose lease leaves less than MIN_SEND_SECONDS to send in from the start."""

    @property
    def lease_seconds(self) -> float:
        return LEASE_MARGIN + MIN_SEND_SECONDS / 2


async def test_a_job_without_send_window_is_given_back_though_a_worker_waits(
    db: Database, database: str, service_env: dict[str, str]
) -> None:
    """The hand-over to a waiting worker checks the lease as the buffer does: a job that could not
    be sent in time is given back unsent, not handed over."""
    base = Settings.from_env({**service_env, "MAIL_ATTEMPT_WORKER_CONCURRENCY": "2"})
    settings = NoWindow(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    h.insert(database, [h.delivery(f"x{i}") for i in range(2)])
    scheduler = engine(settings, db)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            got = await _receivers(scheduler, 2, nursery)
            await scheduler._claim_and_dispatch(2)
            assert got == []
            nursery.cancel_scope.cancel()
    assert scheduler.released == 2 and scheduler.buffered == 0
    rows = h.deliveries(database)
    assert {r["status"] for r in rows.values()} == {"rendered"}
    assert all(r["lease_owner"] is None and r["attempt_count"] == 0 for r in rows.values())


def test_sigterm_gives_buffered_jobs_back_at_once(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    """Through `mailtrio serve`: at SIGTERM the jobs claimed ahead go back on the schedule before
    the attempts in flight have even finished; those finish and are sent once; nothing is left
    `sending`."""
    server = smtp_factory(tls="none", auth=None,
                          rules=[{"match": "@example\\.com$", "action": "slow_rcpt", "delay_s": 4}])
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="20s", MAIL_SHUTDOWN_TIMEOUT="15s",
                   MAIL_ATTEMPT_WORKER_CONCURRENCY="4")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    workers = 4
    ahead = CLAIM_AHEAD_PER_WORKER * workers
    h.insert(dsn, [h.delivery(f"s{i}") for i in range(20)])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        deadline = time.monotonic() + 20
        # Every worker inside its transaction (it connects only once it holds a job), and the
        # buffer full behind them.
        while (len([e for e in server.events() if e["event"] == "connect"]) < workers
               or h.status_counts(dsn).get("sending", 0) < workers + ahead):
            assert time.monotonic() < deadline, h.status_counts(dsn)
            time.sleep(0.05)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.events()[-1] == "shutdown complete"
        given_back = proc.find("claims given back")
        events = proc.events()
    assert sum(e["count"] for e in given_back) == ahead, given_back
    assert events.index("claims given back") < events.index("attempt workers stopped")
    accepted = server.accepted()
    assert len(accepted) == workers  # the attempts in flight finished, each sent once
    # given back before any attempt in flight had its reply
    back_at = min(datetime.fromisoformat(e["timestamp"]).timestamp() for e in given_back)
    assert back_at < min(e["ts"] for e in accepted)
    rows = h.deliveries(dsn)
    assert not [r for r in rows.values() if r["status"] == "sending"]
    assert Counter(r["status"] for r in rows.values()) == {"sent": workers, "rendered": ahead,
                                                            "queued": 20 - workers - ahead}
    assert {r["message_id"] for r in rows.values() if r["status"] == "sent"} == {e["message_id"] for e in accepted}
    for r in rows.values():
        if r["status"] == "rendered":
            assert r["attempt_count"] == 0 and h.attempts(dsn, r["delivery_id"]) == []
