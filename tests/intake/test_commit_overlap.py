"""Two intake commits in flight: a batch read while the one before it is being committed is
committed at once when nothing in it can be decided differently by that earlier batch
(`may_commit_together`); otherwise it waits, so the earlier command wins, as in stream order.

The rule is checked on its own, then through the real consumer against Redis and PostgreSQL with
the earlier batch held in its commit by a row lock (an uncommitted reservation of its key taken
by another session)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
import trio

from mailtrio.commands import Command, Outcome, validate
from mailtrio.config import Settings
from mailtrio.intake import may_commit_together
from tests.intake.conftest import Tables, as_bytes, entry, eventually, opened, settings_for

NOW = datetime.now(UTC)


def outcome(n: int, **overrides: Any) -> Outcome:
    return validate(f"{n}-0", as_bytes(entry(**overrides)), now=NOW, has_template=lambda _: True)


def command(n: int, **overrides: Any) -> Command:
    out = outcome(n, **overrides)
    assert isinstance(out, Command), out
    return out


# -- the rule ----------------------------------------------------------------------------------------
def test_disjoint_batches_and_exact_repeats_may_commit_together() -> None:
    a = command(1, delivery_id="a", idempotency_key="ka")
    b = command(2, delivery_id="b", idempotency_key="kb")
    assert may_commit_together([a], [b])
    assert may_commit_together([a, b], [command(3, delivery_id="a", idempotency_key="ka")])
    # malformed entries depend on nothing, on either side
    bad = outcome(4, delivery_id="a", idempotency_key="ka", payload_mode="nonsense")
    assert not isinstance(bad, Command)
    assert may_commit_together([bad], [a]) and may_commit_together([a], [bad])
    assert may_commit_together([], [a])


def test_a_later_command_that_an_earlier_one_decides_waits() -> None:
    a = command(1, delivery_id="a", idempotency_key="ka")
    # same key, other content: the earlier one wins, the later one is a conflict
    assert not may_commit_together([a], [command(2, delivery_id="a", idempotency_key="ka", locale="fr")])
    # same key, other delivery id
    assert not may_commit_together([a], [command(3, delivery_id="a2", idempotency_key="ka")])
    # same delivery id under another key
    assert not may_commit_together([a], [command(4, delivery_id="a", idempotency_key="other")])
    # one such command makes the whole batch wait
    later = [command(5, delivery_id="z", idempotency_key="kz"), command(6, delivery_id="a", idempotency_key="kx")]
    assert not may_commit_together([a], later)


def test_a_repeat_of_a_contested_key_or_id_waits() -> None:
    """Where the earlier batch holds two different commands for one key or one delivery id, which
    of them wins decides the repeat's outcome: it waits, even as an exact repeat of one of them."""
    a = command(1, delivery_id="a", idempotency_key="ka")
    same_id = command(2, delivery_id="a", idempotency_key="kb")
    same_key = command(3, delivery_id="c", idempotency_key="ka")
    repeat = command(4, delivery_id="a", idempotency_key="ka")
    assert not may_commit_together([a, same_id], [repeat])
    assert not may_commit_together([same_id, a], [repeat])
    assert not may_commit_together([a, same_key], [repeat])
    # the same command twice in the earlier batch is not contested
    assert may_commit_together([a, command(5, delivery_id="a", idempotency_key="ka")], [repeat])


# -- through the consumer ----------------------------------------------------------------------------
@contextmanager
def held_reservation(dsn: str, key: str, source: str = "authsession") -> Iterator[psycopg.Connection[Any]]:
    """An uncommitted reservation of `key` in another session: intake's statement for a command
    with that key waits on its row lock until the session rolls back."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO mail.idempotency_reservations"
            " (source, idempotency_key, delivery_id, fingerprint, created_at, expires_at)"
            " VALUES (%s, %s, 'blocker', 'blocker', now(), now() + interval '1 hour')",
            (source, key),
        )
        try:
            yield conn
        finally:
            conn.rollback()


def waiting_on_a_lock(tables: Tables) -> bool:
    return bool(tables.one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"))


def xadd_together(client: redis.Redis, key: str, *entries: dict[str, str]) -> list[str]:
    """Entries added in one MULTI/EXEC: a consumer reads them in one batch."""
    pipe = client.pipeline(transaction=True)
    for fields in entries:
        pipe.xadd(key, fields)  # type: ignore[arg-type]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]


def pending(client: redis.Redis, key: str) -> int:
    return int(client.xpending(key, "mailservice")["pending"])


def consumer_settings(service_env: dict[str, str]) -> Settings:
    # no sweep of idle entries while the test runs: every batch comes from new entries
    return settings_for(service_env, MAIL_REDIS_CLAIM_IDLE="300s")


async def test_a_disjoint_batch_commits_while_the_one_before_waits(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str,
) -> None:
    settings = consumer_settings(service_env)
    with held_reservation(database, "k-first") as blocker:
        async with opened(settings) as w, trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            xadd(entry(delivery_id="first", idempotency_key="k-first"))
            await eventually(lambda: waiting_on_a_lock(tables), what="the first batch waiting in its commit")
            later = xadd_together(redis_client, stream_key, *(entry(delivery_id=f"later-{i}") for i in range(5)))
            # committed (and acknowledged) while the batch before it is still waiting
            await eventually(lambda: tables.count("deliveries") == 5, what="the later batch committed")
            assert "first" not in tables.deliveries()
            assert waiting_on_a_lock(tables)
            assert w.consumer.overlapped == 1
            blocker.rollback()
            await eventually(lambda: "first" in tables.deliveries(), what="the first batch committed")
            await eventually(lambda: pending(redis_client, stream_key) == 0, what="everything acknowledged")
            nursery.cancel_scope.cancel()
    assert set(tables.deliveries()) == {"first", *(f"later-{i}" for i in range(5))}
    assert len(later) == 5 and tables.count("malformed_commands") == 0


async def test_a_batch_the_one_before_decides_waits_and_the_earlier_command_wins(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str,
) -> None:
    settings = consumer_settings(service_env)
    with held_reservation(database, "k-first") as blocker:
        async with opened(settings) as w, trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            xadd(entry(delivery_id="first", idempotency_key="k-first"))
            await eventually(lambda: waiting_on_a_lock(tables), what="the first batch waiting in its commit")
            _, changed = xadd_together(redis_client, stream_key, entry(delivery_id="other"),
                                       entry(delivery_id="first", idempotency_key="k-first", locale="fr"))
            # read, and held back: nothing of it is committed while the first batch waits
            await eventually(lambda: pending(redis_client, stream_key) == 3, what="the later batch read")
            await trio.sleep(0.5)
            assert tables.count("deliveries") == 0
            assert w.consumer.overlapped == 0
            blocker.rollback()
            await eventually(lambda: tables.count("deliveries") == 2 and tables.count("malformed_commands") == 1,
                             what="both batches committed")
            nursery.cancel_scope.cancel()
    deliveries = tables.deliveries()
    assert set(deliveries) == {"first", "other"}
    assert deliveries["first"]["locale"] == "en"  # the earlier command won
    assert tables.malformed()[changed]["failure_code"] == "idempotency_conflict"


async def test_an_exact_repeat_commits_beside_its_original_and_makes_one_delivery(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str,
) -> None:
    """The repeat's batch goes ahead; its statement queues on the original's reservation, so
    whichever the database takes first, one delivery results and the other entry is its
    duplicate."""
    settings = consumer_settings(service_env)
    with held_reservation(database, "k-block") as blocker:
        async with opened(settings) as w, trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            original = entry(delivery_id="orig", idempotency_key="k-orig")
            first, _ = xadd_together(redis_client, stream_key, original,
                                     entry(delivery_id="blocked", idempotency_key="k-block"))
            await eventually(lambda: waiting_on_a_lock(tables), what="the first batch waiting in its commit")
            repeat, _ = xadd_together(redis_client, stream_key, original, entry(delivery_id="beside"))
            await eventually(lambda: w.consumer.overlapped == 1, what="the repeat's batch committing beside it")
            blocker.rollback()
            await eventually(lambda: tables.count("deliveries") == 3, what="all committed")
            nursery.cancel_scope.cancel()
    deliveries = tables.deliveries()
    assert set(deliveries) == {"orig", "blocked", "beside"}
    # the first batch's statement reached the original's key only after the lock: the repeat
    # made the delivery, and the original entry is its duplicate
    assert deliveries["orig"]["stream_entry_id"] == repeat != first
    assert tables.count("malformed_commands") == 0
    assert tables.one("SELECT count(*) FROM mail.idempotency_reservations WHERE idempotency_key = 'k-orig'") == 1
