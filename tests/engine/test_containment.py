"""Containment and provable ownership, statement and session level: the lease-time window, the
lease check before MAIL FROM and before the message content, a row that cannot be decoded failing
alone, repeated interruption ending in a dead letter, and rescue sparing a live owner."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import psycopg
import pytest
import trio

from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.identity import IdentityConflict, InstanceIdentity
from mailtrio.providers.base import AttemptStatus, Envelope, Phase
from mailtrio.providers.stub import StubProvider
from mailtrio.store import Database, StartupError
from mailtrio.store import engine as store
from mailtrio.store.queries import q
from mailtrio.workers import (
    LEASE_MARGIN,
    Job,
    WorkerPool,
    interrupted_finish,
    is_deterministic,
    send_window,
)
from tests.engine import helpers as h
from tests.engine.test_smtp_provider import MSG, provider
from tests.support.serve import TEMPLATES
from tests.support.smtpserver import SmtpTestServer

DEEP = 5000  # JSON nesting far past Python's recursion limit (PostgreSQL's jsonb takes it)


def settings(service_env: dict[str, str], **overrides: str) -> Settings:
    return Settings.from_env({**service_env, **overrides})


# -- the send window --------------------------------------------------------------------------------


def test_send_window_is_the_earlier_of_the_timeout_and_the_lease_end() -> None:
    # a fresh claim: MAIL_SMTP_TIMEOUT (30 s) binds, the lease (45 s) minus the margin does not
    assert send_window(lease_end=100.0 + 45.0, now=100.0, smtp_timeout=30.0) == 30.0
    # 20 s into the lease: only 45 - 20 - margin left
    assert send_window(lease_end=145.0, now=120.0, smtp_timeout=30.0) == pytest.approx(25.0 - LEASE_MARGIN)
    # resumed after the lease ended: nothing (negative), so the worker gives it back unsent
    assert send_window(lease_end=145.0, now=160.0, smtp_timeout=30.0) < 0
    assert send_window(lease_end=math.inf, now=0.0, smtp_timeout=3.0) == 3.0


def test_deterministic_failures_are_told_apart() -> None:
    assert is_deterministic(UnicodeEncodeError("ascii", "é", 0, 1, "no"))
    assert is_deterministic(RecursionError("deep"))
    assert not is_deterministic(KeyError("x"))
    assert not is_deterministic(OSError("disk"))


# -- the lease check in the SMTP session ----------------------------------------------------------


async def test_session_asks_the_lease_before_mail_from_and_before_the_content(
    smtp_factory: Callable[..., SmtpTestServer],
) -> None:
    server = smtp_factory(tls="none", auth=None)
    session = provider(server).session()

    def checked(answers: list[bool]) -> tuple[Envelope, list[bool]]:
        asked: list[bool] = []

        def lease_ok() -> bool:
            answer = answers[len(asked)]
            asked.append(answer)
            return answer

        env = Envelope("no-reply@mailtrio.test", ["x@example.com"], "notification", "d1", "<m1@t>",
                       lease_ok=lease_ok)
        return env, asked

    try:
        # no time left before MAIL FROM: no transaction at all
        env, asked = checked([False])
        report = await session.send(env, MSG)
        assert report.released and report.phase == Phase.MAIL and not report.handed_over
        assert asked == [False]
        # time ran out between MAIL FROM and the content: the transaction is abandoned unsent
        env, asked = checked([True, False])
        report = await session.send(env, MSG)
        assert report.released and report.phase == Phase.DATA
        assert asked == [True, False]
        # with time left, the same session sends (on a new connection) exactly once
        env, asked = checked([True, True])
        report = await session.send(env, MSG)
        assert report.status == AttemptStatus.PROVIDER_ACCEPTED and not report.released
        assert asked == [True, True]
    finally:
        await session.close()
    await trio.sleep(0.2)
    assert len(server.accepted()) == 1
    assert not [e for e in server.events() if e["event"] not in ("connect", "ehlo", "accepted")]


# -- decoding and preparing a claimed batch --------------------------------------------------------


def deep_row(delivery_id: str) -> dict[str, object]:
    row = h.delivery(delivery_id)
    payload = json.loads(str(row["payload"]))
    head = json.dumps({k: v for k, v in payload.items() if k != "variables"})[:-1]
    row["payload"] = head + ', "variables": {"code": "1", "deep": ' + "[" * DEEP + "]" * DEEP + "}}"
    return row


async def test_a_row_that_cannot_be_decoded_fails_alone(
    db: Database, database: str, service_env: dict[str, str]
) -> None:
    h.insert(database, [h.delivery(f"ok{i}") for i in range(3)] + [deep_row("deep")])
    send, receive = trio.open_memory_channel[Job](0)
    pool = WorkerPool(settings(service_env), db, Catalog.load(TEMPLATES, "en"), StubProvider(), receive)
    prepared, _ = await db.run(lambda conn: store.claim_batch(
        conn, owner="me", lease_seconds=30, limit=10, prepare=pool.prepare_claims))
    assert sorted(j.claim.delivery_id for j in prepared.jobs) == ["ok0", "ok1", "ok2"]
    assert prepared.stored == {"ok0", "ok1", "ok2"}
    row = h.deliveries(database, ["deep"])["deep"]
    assert row["status"] == "failed" and row["lease_owner"] is None
    assert row["status_reason"].startswith("decode_failed: the stored delivery cannot be decoded: RecursionError")
    assert h.attempts(database, "deep") == []
    await send.aclose()
    await receive.aclose()


async def test_a_job_knows_when_its_lease_ends(db: Database, database: str, service_env: dict[str, str]) -> None:
    h.insert(database, [h.delivery("one")])
    _, receive = trio.open_memory_channel[Job](0)
    s = settings(service_env, MAIL_SMTP_TIMEOUT="2s")
    pool = WorkerPool(s, db, Catalog.load(TEMPLATES, "en"), StubProvider(), receive)
    before = trio.current_time()
    prepared, _ = await db.run(lambda conn: store.claim_batch(
        conn, owner="me", lease_seconds=s.lease_seconds, limit=1,
        prepare=lambda c, b: pool.prepare_claims(c, b, lease_start=before)))
    [job] = prepared.jobs
    assert job.claimed_at == before and job.lease_end == before + 17.0
    await receive.aclose()


# -- repeated interruption ----------------------------------------------------------------------------


async def claim_one(db: Database, owner: str, lease: float) -> store.Claim:
    claims = await db.run(lambda conn: store.claim_due(conn, owner=owner, lease_seconds=lease, limit=1))
    assert len(claims) == 1
    return claims[0]


async def rescue(db: Database, max_interrupted: int = 3) -> list[dict[str, object]]:
    return await db.run(lambda conn: store.rescue_expired(conn, rescuer="rescuer", max_interrupted=max_interrupted))


async def test_the_third_interrupted_attempt_in_a_row_dead_letters(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("x")])
    for n in (1, 2):
        c = await claim_one(db, "gone", 0.01)
        assert c.interrupted_streak == n - 1
        await trio.sleep(0.05)
        [r] = await rescue(db)
        assert r["status"] == "queued"
    c = await claim_one(db, "gone", 0.01)
    await trio.sleep(0.05)
    [r] = await rescue(db)
    assert r["status"] == "dead_letter"
    row = h.deliveries(database, ["x"])["x"]
    assert row["status"] == "dead_letter" and row["interrupted_streak"] == 3 and row["next_attempt_at"] is None
    assert row["status_reason"].startswith("repeatedly interrupted")
    [dl] = h.query(database, "SELECT reason FROM mail.dead_letters WHERE delivery_id = 'x'")
    assert dl["reason"].startswith("repeatedly interrupted: 3 consecutive")
    assert [a["status"] for a in h.attempts(database, "x")] == ["interrupted"] * 3
    # an operator's retry starts the count again
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(q("delivery_retry"), {"delivery_id": "x"})
    assert h.deliveries(database, ["x"])["x"]["interrupted_streak"] == 0


async def test_any_other_attempt_resets_the_count(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("y")])
    c = await claim_one(db, "gone", 0.01)
    await trio.sleep(0.05)
    await rescue(db)
    c = await claim_one(db, "me", 30)
    assert c.interrupted_streak == 1
    deferred = store.Finish(c.delivery_id, c.lease_started_at, "rendered", "451 later", "provider_deferred", 5,
                            "451 later", {"phase": "rcpt"}, 0, c.ladder_step + 1)
    assert await db.run(lambda conn: store.finish_attempts(conn, owner="me", items=[deferred])) == {"y"}
    assert h.deliveries(database, ["y"])["y"]["interrupted_streak"] == 0
    # a shutdown put-back counts; the one that makes MAIL_MAX_INTERRUPTED dead-letters
    for n in (1, 2):
        c = await claim_one(db, "me", 30)
        finish = interrupted_finish(c, 2, elapsed_ms=1, resolved_locale=None)
        assert (finish.status == "dead_letter") == (n == 2)
        items = [finish]
        assert await db.run(lambda conn, items=items: store.finish_attempts(conn, owner="me", items=items)) == {"y"}
    row = h.deliveries(database, ["y"])["y"]
    assert row["status"] == "dead_letter" and row["interrupted_streak"] == 2
    assert h.query(database, "SELECT reason FROM mail.dead_letters WHERE delivery_id = 'y'")[0]["reason"] \
        .startswith("repeatedly interrupted")


# -- rescue spares a live owner ------------------------------------------------------------------------


def hold_identity(dsn: str, instance_id: str) -> psycopg.Connection[object]:
    conn: psycopg.Connection[object] = psycopg.connect(dsn, autocommit=True)
    row = conn.execute(q("identity_lock"), {"instance_id": instance_id}).fetchone()
    assert row is not None and row[0] is True
    return conn


async def test_an_expired_lease_of_a_live_owner_is_not_rescued(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("mine"), h.delivery("theirs")])
    alive = hold_identity(database, "alive-1")
    try:
        await claim_one(db, "alive-1", 0.01)
        await claim_one(db, "dead-1", 0.01)
        await trio.sleep(0.05)
        rescued = await rescue(db)
        assert [r["delivery_id"] for r in rescued] == ["theirs"]
        assert h.deliveries(database, ["mine"])["mine"]["status"] == "sending"
        holder = await db.run(lambda conn: store.identity_holder(conn, instance_id="alive-1"))
        assert holder is not None and holder["pid"] == alive.info.backend_pid
    finally:
        alive.close()
    # the owner is gone now (its session ended): its lease is rescued
    for _ in range(50):
        rescued = await rescue(db)
        if rescued:
            break
        await trio.sleep(0.05)
    assert [r["delivery_id"] for r in rescued] == ["mine"]
    assert await db.run(lambda conn: store.identity_holder(conn, instance_id="alive-1")) is None


# -- the identity lock ---------------------------------------------------------------------------------


def terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])


async def take_lock_away(db: Database, database: str, instance_id: str) -> psycopg.Connection[object]:
    """End the session holding `instance_id`'s identity lock and take the lock on a connection of
    our own (another process, or a stray session), before its owner takes it again."""
    holder = await db.run(lambda conn: store.identity_holder(conn, instance_id=instance_id))
    assert holder is not None
    terminate(database, holder["pid"])
    with trio.fail_after(10):
        while True:
            conn: psycopg.Connection[object] = psycopg.connect(database, autocommit=True)
            row = conn.execute(q("identity_lock"), {"instance_id": instance_id}).fetchone()
            if row is not None and row[0] is True:
                return conn
            conn.close()
            await trio.sleep(0.01)


async def test_a_second_identity_is_refused_and_a_broken_lock_is_taken_again(db: Database, database: str) -> None:
    first = InstanceIdentity(db, "inst-1")
    await first.acquire()
    assert first.holds()
    with pytest.raises(StartupError, match=r"MAIL_INSTANCE_ID 'inst-1' is already in use by a live process"):
        await InstanceIdentity(db, "inst-1").acquire()
    await InstanceIdentity(db, "inst-2").acquire()  # another id is free
    holder = await db.run(lambda conn: store.identity_holder(conn, instance_id="inst-1"))
    assert holder is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        terminate(database, holder["pid"])  # e.g. a PostgreSQL restart or failover
        with trio.fail_after(15):
            while first.losses == 0 or not first.holds():
                await first.changed.wait()  # lost, then taken again
        again = await db.run(lambda conn: store.identity_holder(conn, instance_id="inst-1"))
        assert again is not None and again["pid"] != holder["pid"]
        nursery.cancel_scope.cancel()
    # released at the end
    assert await db.run(lambda conn: store.identity_holder(conn, instance_id="inst-1")) is None


async def test_a_lock_taken_by_another_process_meanwhile_stops_this_one(db: Database, database: str) -> None:
    mine = InstanceIdentity(db, "inst-3")
    await mine.acquire()
    clone = await take_lock_away(db, database, "inst-3")  # the other process gets the lock first
    try:
        with trio.fail_after(20), pytest.raises(IdentityConflict, match="MAIL_INSTANCE_ID 'inst-3' was taken"):
            await mine.run()
        assert not mine.holds()
    finally:
        clone.close()


async def test_a_session_that_lets_the_lock_go_within_moments_is_not_another_process(
    db: Database, database: str
) -> None:
    """After this process lost its lock, a session that holds it for a moment and lets it go (an
    attempt of this very process abandoned at its deadline while the network healed, which reached
    the server anyway) is waited out: the lock is taken again and the process goes on."""
    mine = InstanceIdentity(db, "inst-4")
    await mine.acquire()
    stray: psycopg.Connection[object] | None = await take_lock_away(db, database, "inst-4")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(mine.run)
            await trio.sleep(2.0)  # lost (the probe), and the stray holder seen: under STARTUP_WAIT
            assert not mine.holds()
            stray.close()
            stray = None
            with trio.fail_after(10):
                while not mine.holds():
                    await mine.changed.wait()
            assert mine.losses == 1
            nursery.cancel_scope.cancel()
    finally:
        if stray is not None:
            stray.close()
