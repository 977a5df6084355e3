"""Two intake commits in flight: a batch read while the one before it is being committed is
committed at once when nothing in it can be decided differently by that earlier batch
(`may_commit_together`); otherwise it waits, so the earlier command wins, as in stream order.

The rule is checked on its own, then through the real consumer against Redis and PostgreSQL with
the earlier batch held in its commit by a row lock (an uncommitted reservation of its key taken
by another session)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailtrio import bridge, intake
from mailtrio.commands import Command, Malformed, Outcome, conflict, validate
from mailtrio.config import Settings
from mailtrio.intake import may_commit_together
from mailtrio.store import Database
from mailtrio.store import intake as store
from tests.intake.conftest import Tables, Wiring, as_bytes, entry, eventually, opened, settings_for

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


@asynccontextmanager
async def first_batch_held(settings: Settings, database: str, tables: Tables, xadd: Any
                           ) -> AsyncIterator[tuple[Wiring, psycopg.Connection[Any]]]:
    """A running consumer whose first batch (`first`, key `k-first`) waits in its commit on a row
    lock another session holds (roll that session back to let it go); stopped on the way out."""
    with held_reservation(database, "k-first") as blocker:
        async with opened(settings) as w, trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            xadd(entry(delivery_id="first", idempotency_key="k-first"))
            await eventually(lambda: waiting_on_a_lock(tables), what="the first batch waiting in its commit")
            yield w, blocker
            nursery.cancel_scope.cancel()


async def test_a_disjoint_batch_commits_while_the_one_before_waits(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intake, "OVERLAP_MIN", 5)
    settings = consumer_settings(service_env)
    async with first_batch_held(settings, database, tables, xadd) as (w, blocker):
        later = xadd_together(redis_client, stream_key, *(entry(delivery_id=f"later-{i}") for i in range(5)))
        # committed (and acknowledged) while the batch before it is still waiting
        await eventually(lambda: tables.count("deliveries") == 5, what="the later batch committed")
        assert "first" not in tables.deliveries()
        assert waiting_on_a_lock(tables)
        assert w.consumer.overlapped == 1
        blocker.rollback()
        await eventually(lambda: "first" in tables.deliveries(), what="the first batch committed")
        await eventually(lambda: pending(redis_client, stream_key) == 0, what="everything acknowledged")
    assert set(tables.deliveries()) == {"first", *(f"later-{i}" for i in range(5))}
    assert len(later) == 5 and tables.count("malformed_commands") == 0


async def test_a_small_batch_waits_for_the_commit_before_it(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str,
) -> None:
    """Below OVERLAP_MIN entries (a trickle, not a backlog) a batch is not committed beside the
    one before it, even with nothing in common: it waits, and is topped up meanwhile."""
    settings = consumer_settings(service_env)
    assert intake.OVERLAP_MIN > 5
    async with first_batch_held(settings, database, tables, xadd) as (w, blocker):
        xadd_together(redis_client, stream_key, *(entry(delivery_id=f"later-{i}") for i in range(5)))
        await eventually(lambda: pending(redis_client, stream_key) == 6, what="the later batch read")
        await trio.sleep(0.5)
        assert tables.count("deliveries") == 0 and w.consumer.overlapped == 0
        blocker.rollback()
        await eventually(lambda: tables.count("deliveries") == 6, what="both batches committed")


async def test_a_batch_the_one_before_decides_waits_and_the_earlier_command_wins(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intake, "OVERLAP_MIN", 1)
    settings = consumer_settings(service_env)
    async with first_batch_held(settings, database, tables, xadd) as (w, blocker):
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
    deliveries = tables.deliveries()
    assert set(deliveries) == {"first", "other"}
    assert deliveries["first"]["locale"] == "en"  # the earlier command won
    assert tables.malformed()[changed]["failure_code"] == "idempotency_conflict"


async def test_an_exact_repeat_commits_beside_its_original_and_makes_one_delivery(
    service_env: dict[str, str], xadd: Any, tables: Tables, database: str,
    redis_client: redis.Redis, stream_key: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The repeat's batch goes ahead; its statement queues on the original's reservation, so
    whichever the database takes first, one delivery results and the other entry is its
    duplicate."""
    monkeypatch.setattr(intake, "OVERLAP_MIN", 2)
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


# -- the rule against the database: overlapping commits decide as serial ones ----------------------
@st.composite
def two_batches(draw: st.DrawFn) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """An earlier batch over a tiny space of keys, ids and contents (repeats, conflicts inside
    it), and a later one."""

    def fields(tag: str) -> dict[str, str]:
        return entry(delivery_id=f"{tag}d{draw(st.integers(0, 2))}",
                     idempotency_key=f"{tag}k{draw(st.integers(0, 2))}",
                     source=draw(st.sampled_from(["authsession", "notification"])),
                     locale=draw(st.sampled_from(["en", "fr"])))

    earlier = [fields("a") for _ in range(draw(st.integers(1, 6)))]
    # each: an exact repeat of an earlier command, one over the earlier batch's space (it may
    # collide with one: such batches are not committed together), or one of its own
    later = [dict(draw(st.sampled_from(earlier))) if kind == 0 else fields("a" if kind == 1 else "b")
             for kind in draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))]
    return earlier, later


def namespaced(batch: list[dict[str, str]], ns: str, first: int) -> tuple[list[Command], dict[str, dict[str, str]]]:
    """The batch's commands with ids and keys under `ns`, stream entry ids `first`-0 on (unique
    in the database: quarantine rows are recorded once per stream entry id)."""
    out, raw = [], {}
    for n, f in enumerate(batch, start=first):
        f = {**f, "delivery_id": ns + f["delivery_id"], "idempotency_key": ns + f["idempotency_key"]}
        entry_id = f"{n}-0"
        raw[entry_id] = f
        out.append(command_of(entry_id, f))
    return out, raw


def command_of(entry_id: str, f: dict[str, str]) -> Command:
    got = validate(entry_id, as_bytes(f), now=NOW, has_template=lambda _: True)
    assert isinstance(got, Command), got
    return got


def decided(tables: Tables, ns: str) -> tuple[dict[str, tuple[str, str, str]], list[tuple[str, str, str, str]]]:
    """What the database holds for one namespace, with the namespace taken off: each delivery's
    key and content, and the quarantined commands."""
    deliveries = {r["delivery_id"].removeprefix(ns): (r["source"], r["idempotency_key"].removeprefix(ns), r["locale"])
                  for r in tables.rows("SELECT * FROM mail.deliveries WHERE delivery_id LIKE %s", (ns + "%",))}
    rejected = sorted((r["failure_code"], r["delivery_id"].removeprefix(ns),
                       r["fields"]["idempotency_key"].removeprefix(ns), r["fields"]["locale"])
                      for r in tables.rows("SELECT * FROM mail.malformed_commands WHERE delivery_id LIKE %s",
                                           (ns + "%",)))
    return deliveries, rejected


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(batches=two_batches(), delay=st.sampled_from([0.0, 0.0003, 0.001, 0.003]))
def test_batches_committed_together_decide_as_one_after_the_other(
    batches: tuple[list[dict[str, str]], list[dict[str, str]]], delay: float,
    service_env: dict[str, str], tables: Tables,
) -> None:
    """Whenever `may_commit_together` lets a later batch commit beside an earlier one, the
    database ends as if they had been committed one after the other: the same deliveries with
    the same content, the same commands quarantined, every entry decided once."""
    earlier, later = batches
    run = uuid.uuid4().hex[:8]
    serial_ns, together_ns = f"s{run}-", f"t{run}-"
    first = uuid.uuid4().int % 10**15 * 100
    a_serial, raw_serial = namespaced(earlier, serial_ns, first)
    b_serial, raw_b = namespaced(later, serial_ns, first + len(earlier))
    raw_serial.update(raw_b)
    a_together, raw_together = namespaced(earlier, together_ns, first + 50)
    b_together, raw_b = namespaced(later, together_ns, first + 50 + len(earlier))
    raw_together.update(raw_b)
    assume(may_commit_together(a_together, b_together))
    settings_ = settings_for(service_env)

    async def commit(db: Database, cmds: list[Command], raw: dict[str, dict[str, str]]) -> store.BatchResult:
        def make_conflict(cmd: Command, detail: str) -> Malformed:
            return conflict(cmd, detail, raw[cmd.stream_entry_id])

        return await db.transaction(lambda conn: store.commit_batch(
            conn, cmds, [], ttl=timedelta(days=1), message_domain="example.com", make_conflict=make_conflict))

    async def main() -> list[store.BatchResult]:
        async with bridge.open_loop():
            db = Database(settings_.postgres_dsn, 4)
            await db.open()
            try:
                results = [await commit(db, a_serial, raw_serial), await commit(db, b_serial, raw_serial)]
                together: list[store.BatchResult] = []

                async def one(cmds: list[Command]) -> None:
                    together.append(await commit(db, cmds, raw_together))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(one, a_together)
                    await trio.sleep(delay)
                    nursery.start_soon(one, b_together)
                return results + together
            finally:
                await db.close()

    results = trio.run(main)
    serial, together = results[:2], results[2:]

    def counts(rs: list[store.BatchResult]) -> tuple[int, int]:
        return sum(len(r.accepted) + len(r.duplicates) for r in rs), sum(len(r.rejected) for r in rs)

    total = len(earlier) + len(later)
    assert sum(counts(serial)) == sum(counts(together)) == total
    assert counts(serial) == counts(together)
    assert decided(tables, serial_ns) == decided(tables, together_ns)


async def test_a_commit_that_fails_while_the_next_one_committed_loses_and_doubles_nothing(
    service_env: dict[str, str], database: str, tables: Tables, redis_client: redis.Redis, stream_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog in small batches, each committed beside the one before when it may. The first
    batch's commit waits on a row lock while the second commits beside it; then the first one's
    session is terminated. The consumer starts again from its pending entries: every entry is
    decided exactly once (one delivery per command, its repeats duplicates, the later of two
    differing commands for one key a conflict), nothing stays pending."""
    monkeypatch.setattr(intake, "OVERLAP_MIN", 8)
    commands = [entry(delivery_id=f"c-{i}", idempotency_key=f"ck-{i}") for i in range(200)]
    mix: list[dict[str, str]] = []
    for i, c in enumerate(commands):
        mix.append(c)
        if i % 7 == 3:
            mix.append(dict(commands[i - 2]))  # an exact repeat a few entries later
        if i % 50 == 10:
            mix.append(entry(delivery_id=f"c-{i}", idempotency_key=f"ck-{i}", locale="fr"))  # a conflict
    conflicts = sum(1 for f in mix if f["locale"] == "fr")
    pipe = redis_client.pipeline(transaction=False)
    for fields in mix:
        pipe.xadd(stream_key, fields)  # type: ignore[arg-type]
    pipe.execute()
    settings = consumer_settings(service_env)
    with held_reservation(database, "ck-5") as blocker:
        async with opened(settings) as w, trio.open_nursery() as nursery:
            w.consumer._avg_entry_bytes = 1e12  # batches of MIN_BATCH entries
            await nursery.start(w.consumer.run)
            await eventually(lambda: w.consumer.overlapped >= 1 and waiting_on_a_lock(tables),
                             what="the second batch committed beside the first, which waits")
            await eventually(lambda: tables.count("deliveries") > 0, what="the second batch committed")
            assert "c-5" not in tables.deliveries()
            tables.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'")
            # started again from its pending entries: the first batch waits on the lock once more
            await eventually(lambda: waiting_on_a_lock(tables), what="the first batch retried")
            blocker.rollback()
            await eventually(lambda: pending(redis_client, stream_key) == 0
                             and tables.count("deliveries") == len(commands), what="the backlog decided")
            nursery.cancel_scope.cancel()
    deliveries = tables.deliveries()
    assert set(deliveries) == {c["delivery_id"] for c in commands}
    assert all(d["locale"] == "en" for d in deliveries.values())
    rejected = tables.malformed()
    assert len(rejected) == conflicts
    assert all(r["failure_code"] == "idempotency_conflict" for r in rejected.values())
