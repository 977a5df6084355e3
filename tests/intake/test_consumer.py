"""The command consumer against the real Redis and PostgreSQL: outcomes, idempotency (across and
inside batches, two consumers racing), redelivery, pending-first, claiming and recovery."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
import trio
from redis.exceptions import ConnectionError as RedisConnectionError

from mailtrio import bridge, telemetry
from mailtrio.commands import Malformed, validate
from mailtrio.config import Settings
from mailtrio.message import message_id_for, sender_domain
from tests.intake.conftest import Tables, drain, entry, eventually, opened, payload, settings_for

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def pending_count(client: redis.Redis, key: str, group: str = "mailservice") -> int:
    info = client.xpending(key, group)
    return int(info["pending"])


def totals(counts: list[Any]) -> dict[str, int]:
    out = {"read": 0, "accepted": 0, "duplicates": 0, "rejected": 0, "already_recorded": 0, "vanished": 0,
           "acked": 0}
    for c in counts:
        for k in out:
            out[k] += getattr(c, k)
    return out


# -- accepted, malformed --------------------------------------------------------------------------
async def test_accepted_command_becomes_a_queued_delivery(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    body = payload(
        to=["Alice@Example.COM", {"email": "bob@example.com", "name": "Bob"}],
        cc=["Carol@example.com"],
        bcc=[{"email": "dave@example.com"}],
        reply_to="help@example.com",
    )
    entry_id = xadd(entry(delivery_id="d-accept", payload_obj=body, traceparent=TP, locale="pt-BR"))
    async with opened(intake_settings) as w:
        before = datetime.now(UTC)
        counts = totals(await drain(w.consumer))
    assert counts["accepted"] == 1 and counts["acked"] == 1
    row = tables.deliveries()["d-accept"]
    assert row["status"] == "queued"
    assert row["source"] == "authsession"
    assert row["payload_mode"] == "template" and row["template_id"] == "login-code"
    assert row["locale"] == "pt-BR"
    assert row["send_at"] is None
    assert row["next_attempt_at"] == row["schedule_entered_at"]
    assert before - timedelta(seconds=5) < row["next_attempt_at"] < datetime.now(UTC) + timedelta(seconds=5)
    assert row["recipients"] == {
        "to": [{"email": "Alice@example.com", "name": None}, {"email": "bob@example.com", "name": "Bob"}],
        "cc": [{"email": "Carol@example.com", "name": None}],
        "bcc": [{"email": "dave@example.com", "name": None}],
    }
    assert sorted(row["recipient_emails"]) == sorted(
        ["alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"]
    )
    assert row["message_id"] == message_id_for("authsession", "d-accept", sender_domain(intake_settings.smtp_from))
    assert row["traceparent"] == TP
    assert row["stream_entry_id"] == entry_id
    assert row["attempt_count"] == 0 and row["lease_owner"] is None
    stored = tables.rows("SELECT * FROM mail.payloads WHERE delivery_id = 'd-accept'")[0]
    assert stored["payload"] == body
    assert stored["subject"] is None and stored["rendered_at"] is None
    res = tables.rows("SELECT *, expires_at - created_at AS ttl FROM mail.idempotency_reservations")
    assert len(res) == 1
    assert res[0]["delivery_id"] == "d-accept" and res[0]["idempotency_key"] == "key-d-accept"
    assert res[0]["ttl"] == timedelta(hours=168)
    assert pending_count(redis_client, stream_key) == 0


async def test_future_send_at_schedules_the_delivery(intake_settings: Settings, xadd: Any, tables: Tables) -> None:
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    xadd(entry(delivery_id="d-later", send_at=later.isoformat()))
    xadd(entry(delivery_id="d-past", send_at="2001-01-01T00:00:00Z"))
    async with opened(intake_settings) as w:
        await drain(w.consumer)
    rows = tables.deliveries()
    assert rows["d-later"]["send_at"] == later
    assert rows["d-later"]["next_attempt_at"] == later == rows["d-later"]["schedule_entered_at"]
    assert rows["d-past"]["send_at"] == datetime(2001, 1, 1, tzinfo=UTC)
    assert rows["d-past"]["next_attempt_at"] > datetime.now(UTC) - timedelta(minutes=1)


async def test_malformed_entries_are_quarantined_counted_and_acknowledged(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str,
    monkeypatch: Any,
) -> None:
    added: list[tuple[int, dict[str, str]]] = []

    class Recorder:
        def add(self, amount: int, attributes: dict[str, str]) -> None:
            added.append((amount, attributes))

    monkeypatch.setattr(telemetry, "malformed_commands", Recorder())
    ids = {
        xadd(entry(delivery_id="m-json", payload="{oops")): "invalid_json",
        xadd(entry(delivery_id="m-source", source="")): "invalid_field",
        xadd({"delivery_id": "m-nosource", "payload": "{}"}): "missing_field",
        xadd(entry(delivery_id="m-locale", locale="EN_us")): "invalid_locale",
        xadd(entry(delivery_id="m-rcpt", payload_obj=payload(to=["nope"]))): "invalid_recipient",
        xadd(entry(delivery_id="m-tmpl", payload_obj=payload(template_id="nope"))): "unknown_template",
        xadd(entry(delivery_id="m-crlf", payload_obj=payload(to=[{"email": "a@example.com", "name": "A\r\nB"}]))):
            "unsafe_header",
        xadd(entry(delivery_id="m-big", payload="{" + " " * (513 * 1024) + "}")): "payload_too_large",
        xadd({b"\xff\xfe": b"\x00\xff", b"delivery_id": b"m-\xff"}): "missing_field",
    }
    async with opened(intake_settings) as w:
        counts = totals(await drain(w.consumer))
    assert counts["rejected"] == len(ids) and counts["accepted"] == 0 and counts["acked"] == len(ids)
    rows = tables.malformed()
    assert {k: r["failure_code"] for k, r in rows.items()} == ids
    crlf = next(r for r in rows.values() if r["delivery_id"] == "m-crlf")
    assert crlf["source"] == "authsession"
    assert crlf["fields"]["delivery_id"] == "m-crlf"
    assert json.loads(crlf["fields"]["payload"])["to"][0]["name"] == "A\r\nB"
    assert crlf["failure_detail"] and crlf["received_at"] is not None
    odd = next(r for r in rows.values() if r["delivery_id"] == "m-\\xff")
    assert odd["fields"]["\\xff\\xfe"] == "\\x00\\xff"
    assert sorted(a[1]["failure_code"] for a in added) == sorted(ids.values())
    assert all(a[0] == 1 for a in added)
    assert tables.count("deliveries") == 0
    assert pending_count(redis_client, stream_key) == 0


# -- idempotency ----------------------------------------------------------------------------------
async def test_duplicate_across_batches_and_inside_a_batch(
    intake_settings: Settings, xadd: Any, tables: Tables
) -> None:
    cmd = entry(delivery_id="d-dup", traceparent=TP)
    xadd(cmd)
    async with opened(intake_settings) as w:
        first = totals(await drain(w.consumer))
        xadd({**cmd, "traceparent": "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        xadd(cmd)
        xadd(cmd)
        second = totals(await drain(w.consumer))
    assert first["accepted"] == 1
    assert second["duplicates"] == 3 and second["accepted"] == 0 and second["rejected"] == 0
    assert tables.count("deliveries") == 1 and tables.count("malformed_commands") == 0


async def test_same_key_other_content_is_a_conflict(intake_settings: Settings, xadd: Any, tables: Tables) -> None:
    xadd(entry(delivery_id="d-a", idempotency_key="k1"))
    changed = xadd(entry(delivery_id="d-a", idempotency_key="k1", locale="fr"))
    other_id = xadd(entry(delivery_id="d-b", idempotency_key="k1"))
    async with opened(intake_settings) as w:
        counts = totals(await drain(w.consumer))
    assert counts["accepted"] == 1 and counts["rejected"] == 2
    rows = tables.malformed()
    assert rows[changed]["failure_code"] == rows[other_id]["failure_code"] == "idempotency_conflict"
    assert rows[other_id]["delivery_id"] == "d-b"
    assert "d-a" in rows[other_id]["failure_detail"]
    assert rows[other_id]["fields"]["idempotency_key"] == "k1"
    assert set(tables.deliveries()) == {"d-a"}
    assert tables.deliveries()["d-a"]["locale"] == "en"


async def test_known_delivery_id_under_another_key_is_a_conflict_and_leaves_no_reservation(
    intake_settings: Settings, xadd: Any, tables: Tables
) -> None:
    xadd(entry(delivery_id="d-x", idempotency_key="k1"))
    clash = xadd(entry(delivery_id="d-x", idempotency_key="k2"))
    async with opened(intake_settings) as w:
        await drain(w.consumer)
        assert tables.malformed()[clash]["failure_code"] == "idempotency_conflict"
        keys = {r["idempotency_key"] for r in tables.rows("SELECT * FROM mail.idempotency_reservations")}
        assert keys == {"k1"}
        # k2 is free again: a well-formed command with it and a fresh delivery id is accepted
        xadd(entry(delivery_id="d-y", idempotency_key="k2"))
        counts = totals(await drain(w.consumer))
    assert counts["accepted"] == 1
    assert set(tables.deliveries()) == {"d-x", "d-y"}
    assert tables.deliveries()["d-x"]["idempotency_key"] == "k1"


SEQUENCE = [
    dict(delivery_id="s-1", idempotency_key="k1"),
    dict(delivery_id="s-1", idempotency_key="k1"),  # duplicate
    dict(delivery_id="s-2", idempotency_key="k1"),  # conflict: key reserved with other content
    dict(delivery_id="s-1", idempotency_key="k2"),  # conflict: delivery id of another key
    dict(delivery_id="s-3", idempotency_key="k2"),  # accepted: k2 was released
    dict(delivery_id="s-3", idempotency_key="k2", locale="fr"),  # conflict
    dict(delivery_id="s-4", idempotency_key="k4"),  # accepted
    dict(delivery_id="s-4", idempotency_key="k4"),  # duplicate
]


async def _outcomes(settings: Settings, xadd: Any, tables: Tables, *, one_per_batch: bool) -> list[str]:
    ids = []
    async with opened(settings) as w:
        for spec in SEQUENCE:
            ids.append(xadd(entry(**spec)))
            if one_per_batch:
                await drain(w.consumer)
        await drain(w.consumer)
    deliveries = {r["stream_entry_id"] for r in tables.deliveries().values()}
    malformed = tables.malformed()
    return [
        "accepted" if i in deliveries else malformed[i]["failure_code"] if i in malformed else "duplicate"
        for i in ids
    ]


async def test_repeats_inside_one_batch_behave_as_across_batches(
    service_env: dict[str, str], xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str,
) -> None:
    expected = ["accepted", "duplicate", "idempotency_conflict", "idempotency_conflict", "accepted",
                "idempotency_conflict", "accepted", "duplicate"]
    across = await _outcomes(settings_for(service_env), xadd, tables, one_per_batch=True)
    assert across == expected
    # the same sequence in one batch, on a fresh stream and a clean schema
    tables.rows("TRUNCATE mail.deliveries, mail.idempotency_reservations, mail.malformed_commands CASCADE")
    redis_client.delete(stream_key)
    inside = await _outcomes(settings_for(service_env), xadd, tables, one_per_batch=False)
    assert inside == expected


async def test_an_expired_reservation_can_be_taken_over(intake_settings: Settings, xadd: Any, tables: Tables) -> None:
    xadd(entry(delivery_id="d-old", idempotency_key="k"))
    async with opened(intake_settings) as w:
        await drain(w.consumer)
        tables.rows("UPDATE mail.idempotency_reservations SET expires_at = now() - interval '1 second'")
        # while its delivery is not final, an expired reservation still holds
        xadd(entry(delivery_id="d-new", idempotency_key="k", locale="fr"))
        counts = totals(await drain(w.consumer))
        assert counts["accepted"] == 0 and counts["rejected"] == 1
        tables.rows("UPDATE mail.deliveries SET status = 'sent', next_attempt_at = NULL WHERE delivery_id = 'd-old'")
        xadd(entry(delivery_id="d-new2", idempotency_key="k", locale="fr"))
        counts = totals(await drain(w.consumer))
    assert counts["accepted"] == 1
    assert set(tables.deliveries()) == {"d-old", "d-new2"}
    res = tables.rows("SELECT * FROM mail.idempotency_reservations")
    assert [(r["delivery_id"], r["expires_at"] > datetime.now(UTC)) for r in res] == [("d-new2", True)]


async def test_a_reservation_lasts_until_send_at_plus_the_ttl(service_env: dict[str, str], xadd: Any,
                                                              tables: Tables) -> None:
    settings = settings_for(service_env, MAIL_IDEMPOTENCY_TTL="1s")
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    async with opened(settings) as w:
        xadd(entry(delivery_id="d-later", idempotency_key="k", send_at=later))
        await drain(w.consumer)
    (res,) = tables.rows("SELECT created_at, expires_at FROM mail.idempotency_reservations")
    assert res["expires_at"] - res["created_at"] > timedelta(days=2)
    # retention never deletes a reservation while its delivery is not final, whatever its expiry
    tables.rows("UPDATE mail.idempotency_reservations SET expires_at = now() - interval '1 hour'")
    from mailtrio.retention import Retention
    from mailtrio.store import Database

    async with bridge.open_loop():
        db = Database(settings.postgres_dsn, 2)
        await db.open()
        try:
            counts = await Retention(settings, db).run_once()
            assert counts.idempotency_reservations == 0
            assert tables.count("idempotency_reservations") == 1
            tables.rows("UPDATE mail.deliveries SET status = 'cancelled', next_attempt_at = NULL")
            counts = await Retention(settings, db).run_once()
            assert counts.idempotency_reservations == 1
        finally:
            await db.close()


async def test_two_consumers_racing_on_the_same_commands_create_each_delivery_once(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    commands = [entry(delivery_id=f"r-{i}", idempotency_key=f"rk-{i}") for i in range(40)]
    conflicting = [entry(delivery_id=f"r-{i}", idempotency_key=f"rk-{i}", locale="fr") for i in range(0, 40, 4)]
    pipe = redis_client.pipeline(transaction=False)
    for _ in range(6):
        for c in commands:
            pipe.xadd(stream_key, c)  # type: ignore[arg-type]
    for c in conflicting:
        pipe.xadd(stream_key, c)  # type: ignore[arg-type]
    pipe.execute()
    total_entries = 6 * len(commands) + len(conflicting)
    a = settings_for(service_env, MAIL_INSTANCE_ID="racer-a")
    b = settings_for(service_env, MAIL_INSTANCE_ID="racer-b")
    results: dict[str, list[Any]] = {}

    async def run(name: str, w: Any) -> None:
        out = []
        for _ in range(400):
            counts = await w.consumer.run_once(block=0.05)
            out.append(counts)
            if counts.origin == "new" and counts.read == 0:
                break
        results[name] = out

    from mailtrio import bridge

    async with bridge.open_loop(), opened(a, loop=False) as wa, opened(b, loop=False) as wb:
        # small batches so that both consumers hold overlapping keys at the same moment
        wa.consumer._avg_entry_bytes = wb.consumer._avg_entry_bytes = 1e12
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "a", wa)
            nursery.start_soon(run, "b", wb)
    ta, tb = totals(results["a"]), totals(results["b"])
    assert ta["read"] > 0 and tb["read"] > 0, (ta, tb)
    assert ta["read"] + tb["read"] == total_entries
    assert ta["accepted"] + tb["accepted"] == len(commands)
    assert tables.count("deliveries") == len(commands)
    outcomes = ta["accepted"] + tb["accepted"] + ta["duplicates"] + tb["duplicates"] + ta["rejected"] + tb["rejected"]
    assert outcomes == total_entries
    malformed = tables.malformed()
    assert all(r["failure_code"] == "idempotency_conflict" for r in malformed.values())
    assert len(malformed) == ta["rejected"] + tb["rejected"]
    assert pending_count(redis_client, stream_key) == 0


# -- delivery guarantees ----------------------------------------------------------------------
class AckFailsOnce:
    """Wraps a Stream: the first XACK fails after the batch is committed (a crash between commit
    and acknowledge, as seen by the consumer)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def ack(self, ids: Any) -> int:
        if not self.failed:
            self.failed = True
            raise RedisConnectionError("connection lost before XACK")
        return int(await self._stream.ack(ids))


async def test_commit_then_failed_ack_yields_no_second_outcome(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    good = [xadd(entry(delivery_id=f"g-{i}")) for i in range(5)]
    bad = [xadd(entry(delivery_id=f"b-{i}", locale="xx_XX")) for i in range(3)]
    async with opened(intake_settings) as w:
        flaky = AckFailsOnce(w.stream)
        w.consumer.stream = flaky  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            await eventually(lambda: flaky.failed and pending_count(redis_client, stream_key) == 0)
            nursery.cancel_scope.cancel()
    assert flaky.failed
    assert tables.count("deliveries") == len(good)
    assert set(tables.malformed()) == set(bad)
    assert {r["stream_entry_id"] for r in tables.deliveries().values()} == set(good)


async def test_own_pending_entries_are_processed_first_after_a_restart(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    read_before_crash = [xadd(entry(delivery_id=f"p-{i}")) for i in range(4)]
    async with opened(intake_settings) as w:
        await w.stream.ensure_group()
        got = await w.stream.read_new(10, 0.1)  # read, then "crash" before committing
        assert [e[0] for e in got] == read_before_crash
    assert pending_count(redis_client, stream_key) == 4
    later = xadd(entry(delivery_id="p-later"))
    async with opened(intake_settings) as w:  # same MAIL_INSTANCE_ID: the same consumer restarted
        first = await w.consumer.run_once(block=0.05)
        assert first.origin == "pending" and first.read == 4 and first.accepted == 4
        rest = totals(await drain(w.consumer))
    assert rest["accepted"] == 1
    assert {r["stream_entry_id"] for r in tables.deliveries().values()} == {*read_before_crash, later}
    assert pending_count(redis_client, stream_key) == 0


async def test_entries_idle_on_a_dead_consumer_are_claimed(
    service_env: dict[str, str], xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    ids = [xadd(entry(delivery_id=f"c-{i}")) for i in range(3)]
    dead = settings_for(service_env, MAIL_INSTANCE_ID="dead-one")
    live = settings_for(service_env, MAIL_INSTANCE_ID="live-one", MAIL_REDIS_CLAIM_IDLE="200ms")
    async with opened(dead) as w:
        await w.stream.ensure_group()
        assert len(await w.stream.read_new(10, 0.1)) == 3
    async with opened(live) as w:
        with trio.fail_after(10):
            while True:
                counts = await w.consumer.run_once(block=0.05)
                if counts.origin == "claimed":
                    break
        assert counts.read == 3 and counts.accepted == 3
    assert {r["stream_entry_id"] for r in tables.deliveries().values()} == set(ids)
    assert pending_count(redis_client, stream_key) == 0


async def test_a_redelivered_entry_keeps_its_single_outcome(
    service_env: dict[str, str], xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    """Two consumers processing the same entries: the first commits and acks nothing, the second
    claims them (as after a crash between commit and XACK)."""
    ids = [xadd(entry(delivery_id=f"rd-{i}")) for i in range(3)] + [xadd(entry(delivery_id="rd-bad", locale="x"))]
    first = settings_for(service_env, MAIL_INSTANCE_ID="first")
    second = settings_for(service_env, MAIL_INSTANCE_ID="second", MAIL_REDIS_CLAIM_IDLE="100ms")
    async with opened(first) as w:
        await w.stream.ensure_group()
        entries = await w.stream.read_new(10, 0.1)
        has_template = w.consumer.catalog.has_template
        outcomes = [validate(i, f, now=datetime.now(UTC), has_template=has_template) for i, f in entries if f]
        result = await w.consumer._commit_tx(outcomes, {i: f for i, f in entries if f}, redelivered=False)
        assert len(result.accepted) == 3 and len(result.rejected) == 1
    await trio.sleep(0.15)
    async with opened(second) as w:
        with trio.fail_after(10):
            while True:
                counts = await w.consumer.run_once(block=0.05)
                if counts.origin == "claimed":
                    break
    assert counts.read == 4 and counts.accepted == 0 and counts.rejected == 0
    assert counts.duplicates == 3 and counts.already_recorded == 1
    assert {r["stream_entry_id"] for r in tables.deliveries().values()} == set(ids[:3])
    assert set(tables.malformed()) == {ids[3]}
    assert pending_count(redis_client, stream_key) == 0


async def test_pending_entries_deleted_from_the_stream_are_acknowledged(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    ids = [xadd(entry(delivery_id=f"v-{i}")) for i in range(3)]
    async with opened(intake_settings) as w:
        await w.stream.ensure_group()
        await w.stream.read_new(10, 0.1)
    redis_client.xdel(stream_key, ids[1])
    async with opened(intake_settings) as w:
        counts = await w.consumer.run_once(block=0.05)
    assert counts.origin == "pending" and counts.vanished == 1 and counts.accepted == 2 and counts.acked == 3
    assert set(tables.deliveries()) == {"v-0", "v-2"}
    assert pending_count(redis_client, stream_key) == 0


# -- recovery -----------------------------------------------------------------------------------
async def test_lost_consumer_group_is_recreated_at_zero(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    xadd(entry(delivery_id="g-1"))
    async with opened(intake_settings) as w:
        await drain(w.consumer)
        # Redis lost the group (restart without persistence): entries already processed come again
        redis_client.xgroup_destroy(stream_key, "mailservice")
        xadd(entry(delivery_id="g-2"))
        again = totals(await drain(w.consumer))
        assert again["duplicates"] == 1 and again["accepted"] == 1
        # the whole key is gone, then a producer adds again (XADD creates the stream, not the group)
        redis_client.delete(stream_key)
        xadd(entry(delivery_id="g-3"))
        last = totals(await drain(w.consumer))
    assert last["accepted"] == 1
    assert set(tables.deliveries()) == {"g-1", "g-2", "g-3"}


async def test_consumer_recovers_from_killed_redis_and_postgres_connections(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    xadd(entry(delivery_id="k-0"))
    client_name = f"mailtrio:{intake_settings.instance_id}"

    async def wait_for(n: int) -> None:
        await eventually(lambda: tables.count("deliveries") >= n, what=f"{n} deliveries")

    async with opened(intake_settings) as w, trio.open_nursery() as nursery:
        await nursery.start(w.consumer.run)
        await wait_for(1)
        def kill() -> bool:
            """Kill the consumer's connections once one is blocked in XREADGROUP (an idle pooled
            connection would be replaced silently by redis-py)."""
            listed = [c for c in redis_client.client_list() if c.get("name") == client_name]
            if not any("b" in c.get("flags", "") for c in listed):
                return False
            for client in listed:
                redis_client.client_kill_filter(_id=client["id"])
            return True

        for round_ in range(3):
            await eventually(kill, what="a blocked consumer connection to kill")
            xadd(entry(delivery_id=f"k-r{round_}"))
            await wait_for(2 + round_)
        db_name = tables.one("SELECT current_database()")
        for _ in range(2):
            tables.rows(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (db_name,)
            )
            xadd(entry(delivery_id=f"k-pg{_}"))
            await wait_for(5 + _)
        # the last batch is committed; its XACK follows the commit
        await eventually(lambda: pending_count(redis_client, stream_key) == 0, what="the last batch acknowledged")
        nursery.cancel_scope.cancel()
    assert tables.count("deliveries") == 6
    assert pending_count(redis_client, stream_key) == 0


async def test_new_deliveries_wake_the_scheduler(intake_settings: Settings, xadd: Any, database: str) -> None:
    import psycopg

    with psycopg.connect(database, autocommit=True) as listener:
        listener.execute("LISTEN mail_schedule")
        xadd(entry(delivery_id="n-1"))
        async with opened(intake_settings) as w:
            await drain(w.consumer)
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in got] == ["mail_schedule"]
        # a batch of deliveries due later wakes nobody: the scheduler finds them by next-due
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        xadd(entry(delivery_id="n-2", send_at=later))
        async with opened(intake_settings) as w:
            counts = totals(await drain(w.consumer))
        assert counts["accepted"] == 1
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []


async def test_an_entry_the_database_refuses_is_quarantined_alone(
    intake_settings: Settings, tables: Tables
) -> None:
    """Validation keeps out what PostgreSQL cannot store; should something slip through anyway,
    the batch is split until the refused entry is found, and only that one is quarantined."""
    now = datetime.now(UTC)
    fields = {f"{i}-0": {k.encode(): v.encode() for k, v in entry(delivery_id=f"db-{i}").items()} for i in range(1, 6)}
    outcomes = [validate(i, f, now=now, has_template=lambda _: True) for i, f in fields.items()]
    poisoned = outcomes[2]
    assert not isinstance(poisoned, Malformed)
    poisoned.payload_json = '{"to": ["a@example.com"], "x": "\\u0000"}'  # jsonb cannot hold NUL
    async with opened(intake_settings) as w:
        result = await w.consumer._commit(outcomes, fields, False)
    assert sorted(c.delivery_id for c in result.accepted) == ["db-1", "db-2", "db-4", "db-5"]
    [bad] = result.rejected
    assert bad.stream_entry_id == "3-0" and bad.failure_code == "invalid_field"
    assert bad.failure_detail.startswith("rejected by the database")
    assert set(tables.deliveries()) == {"db-1", "db-2", "db-4", "db-5"}
    assert tables.malformed()["3-0"]["delivery_id"] == "db-3"


class AckRecorder:
    """Wraps a Stream: records the ids of every XACK (each call still reaches Redis)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.calls: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def ack(self, ids: Any) -> int:
        self.calls.append(list(ids))
        return int(await self._stream.ack(ids))


async def test_acknowledgements_of_batches_committed_close_together_share_one_xack(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    """A trickle of commands (each its own batch and commit): every entry is acknowledged exactly
    once, in fewer XACK calls than batches, and nothing stays pending."""
    async with opened(intake_settings) as w, trio.open_nursery() as nursery:
        recorder = AckRecorder(w.stream)
        w.consumer.stream = recorder  # type: ignore[assignment]
        await nursery.start(w.consumer.run)
        ids = []
        for i in range(40):
            ids.append(xadd(entry(delivery_id=f"t-{i}")))
            await trio.sleep(0.005)
        await eventually(lambda: tables.count("deliveries") == 40 and pending_count(redis_client, stream_key) == 0,
                         what="40 deliveries, nothing pending")
        nursery.cancel_scope.cancel()
    acked = [entry_id for call in recorder.calls for entry_id in call]
    assert sorted(acked) == sorted(ids)  # each entry once
    batches = tables.one("SELECT count(DISTINCT created_at) FROM mail.deliveries")
    assert batches > 5, batches  # the trickle really came in many commits
    assert len(recorder.calls) < batches, (len(recorder.calls), batches)


async def test_a_consumer_stopped_right_after_a_commit_still_acknowledges_it(
    intake_settings: Settings, xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str
) -> None:
    async with opened(intake_settings) as w:
        async with trio.open_nursery() as nursery:
            await nursery.start(w.consumer.run)
            xadd(entry(delivery_id="s-0"))
            # committed, and its acknowledgement gathering others for the next XACK
            await eventually(lambda: w.consumer._ack_round is not None, step=0.001, what="an XACK gathering")
            assert tables.count("deliveries") == 1
            assert pending_count(redis_client, stream_key) == 1
            nursery.cancel_scope.cancel()
        assert pending_count(redis_client, stream_key) == 0  # sent on the way out


# -- waking the scheduler ---------------------------------------------------------------------------
async def test_a_batch_wakes_the_scheduler_only_for_deliveries_it_inserted_due_soon(
    intake_settings: Settings, xadd: Any, tables: Tables
) -> None:
    """The accepting statement itself sends NOTIFY mail_schedule (delivered at commit) when it
    inserted a delivery due within NOTIFY_HORIZON: not for one scheduled later, not for a
    duplicate that inserted nothing."""
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with psycopg.connect(intake_settings.postgres_dsn, autocommit=True) as listener:
        listener.execute("LISTEN mail_schedule")

        def woken(within: float) -> int:
            return len(list(listener.notifies(timeout=within)))

        async with opened(intake_settings) as w:
            xadd(entry(delivery_id="d-later", send_at=later))
            assert totals(await drain(w.consumer))["accepted"] == 1
            assert woken(0.3) == 0
            xadd(entry(delivery_id="d-now"))
            assert totals(await drain(w.consumer))["accepted"] == 1
            assert woken(2.0) == 1
            xadd(entry(delivery_id="d-now"))  # the same command again: a duplicate
            counts = totals(await drain(w.consumer))
            assert counts["duplicates"] == 1 and counts["accepted"] == 0
            assert woken(0.3) == 0
    assert set(tables.deliveries()) == {"d-later", "d-now"}
