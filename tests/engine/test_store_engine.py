"""The engine's statements against a real database: fair claims, fences, ladder fields, rescue."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import trio
from hypothesis import given
from hypothesis import strategies as st

from mailtrio.store import Conn, Database
from mailtrio.store import engine as store
from mailtrio.store.queries import q
from tests.engine import helpers as h


@dataclass
class Prep:
    contents: list[store.ContentWrite] = field(default_factory=list)
    failures: list[store.Finish] = field(default_factory=list)
    claims: list[store.Claim] = field(default_factory=list)
    stored: set[str] = field(default_factory=set)


def render_all(claims: list[store.Claim], broken: list[store.Undecodable] | None = None) -> Prep:
    prep = Prep(claims=claims)
    for c in claims:
        if c.rendered:
            continue
        if c.delivery_id.startswith("bad"):
            prep.failures.append(store.Finish(c.delivery_id, c.lease_started_at, "failed", "render_failed: boom",
                                              None, 0, None, None, None, c.ladder_step))
        else:
            prep.contents.append(store.ContentWrite(c.delivery_id, c.lease_started_at, f"Subject {c.delivery_id}",
                                                    "text", None, {"X-A": "1"}, "en"))
    return prep


async def claim(db: Database, limit: int, owner: str = "me", lease: float = 30.0) -> list[store.Claim]:
    prep, _ = await db.run(lambda conn: store.claim_batch(conn, owner=owner, lease_seconds=lease, limit=limit,
                                                          prepare=render_all))
    return prep.claims


def outcome(
    c: store.Claim, status: str = "sent", attempt: str | None = "provider_accepted", **kw: object
) -> store.Finish:
    fields: dict[str, object] = dict(
        delivery_id=c.delivery_id, lease_started_at=c.lease_started_at, status=status,
        status_reason=None if status == "sent" else "550 5.1.1 nope", attempt_status=attempt, elapsed_ms=12,
        provider_summary="250 2.0.0 ok", details={"phase": "message"}, retry_ms=None, ladder_step=c.ladder_step,
    )
    fields.update(kw)
    return store.Finish(**fields)  # type: ignore[arg-type]


async def finish(db: Database, items: list[store.Finish], owner: str = "me") -> set[str]:
    return await db.run(lambda conn: store.finish_attempts(conn, owner=owner, items=items))


async def test_claim_limit_order_and_lease(db: Database, database: str) -> None:
    h.insert(database, [h.delivery(f"n{i}", source="notification") for i in range(5)])
    h.insert(database, [h.delivery("future", delay_s=3600)])
    h.insert(database, [h.delivery(f"a{i}", source="authsession") for i in range(2)])  # newer than n*
    claims = await claim(db, 3)
    # authsession first although younger, then the oldest notification
    assert [c.delivery_id for c in claims] == ["a0", "a1", "n0"]
    rows = h.deliveries(database, ["a0", "n0", "n1", "future"])
    for i in ("a0", "n0"):
        r = rows[i]
        assert r["status"] == "sending" and r["lease_owner"] == "me" and r["next_attempt_at"] is None
        assert r["lease_expires_at"] - r["lease_started_at"] == timedelta(seconds=30)
    assert rows["n1"]["status"] == "queued"
    prep, wait = await db.run(lambda conn: store.claim_batch(conn, owner="me", lease_seconds=30, limit=10,
                                                             prepare=render_all))
    assert sorted(c.delivery_id for c in prep.claims) == ["n1", "n2", "n3", "n4"]  # never the future one
    assert wait is not None and 3590 < wait <= 3600  # read with the claim: when the next one is due
    assert h.deliveries(database, ["future"])["future"]["status"] == "queued"
    # nothing due: no claim, and the wait still comes back (the statement's row with no claim)
    prep, wait = await db.run(lambda conn: store.claim_batch(conn, owner="me", lease_seconds=30, limit=10,
                                                             prepare=render_all))
    assert prep.claims == [] and wait is not None and 3590 < wait <= 3600


async def test_concurrent_claims_are_disjoint(db: Database, database: str) -> None:
    h.insert(database, [h.delivery(f"d{i}") for i in range(200)])
    got: list[list[str]] = []

    async def one(owner: str) -> None:
        for _ in range(10):
            got.append([c.delivery_id for c in await claim(db, 7, owner=owner)])

    async with trio.open_nursery() as n:
        for k in range(4):
            n.start_soon(one, f"owner-{k}")
    ids = [i for batch in got for i in batch]
    assert len(ids) == len(set(ids)) == 200


async def test_content_and_render_failures_are_written_with_the_claim(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("good"), h.delivery("bad-1")])
    await claim(db, 5)
    rows = h.deliveries(database)
    # the render is stored with the content alone; the delivery row learns its locale from the outcome
    assert rows["good"]["status"] == "sending" and rows["good"]["resolved_locale"] is None
    assert rows["bad-1"]["status"] == "failed" and rows["bad-1"]["status_reason"] == "render_failed: boom"
    assert rows["bad-1"]["lease_owner"] is None and rows["bad-1"]["attempt_count"] == 0
    assert h.attempts(database, "bad-1") == []
    payload = h.query(database, "SELECT * FROM mail.payloads WHERE delivery_id = 'good'")[0]
    assert payload["subject"] == "Subject good" and payload["rendered_at"] is not None
    assert payload["headers"] == {"X-A": "1"} and payload["resolved_locale"] == "en"


async def test_finish_is_fenced_on_owner_and_lease(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("d1")])
    [c] = await claim(db, 1)
    stale = outcome(c, lease_started_at=c.lease_started_at - timedelta(microseconds=1))
    assert await finish(db, [stale]) == set()
    assert await finish(db, [outcome(c)], owner="someone-else") == set()
    assert h.deliveries(database, ["d1"])["d1"]["status"] == "sending"
    assert h.attempts(database, "d1") == []
    assert await finish(db, [outcome(c, resolved_locale="pt-BR")]) == {"d1"}
    row = h.deliveries(database, ["d1"])["d1"]
    assert row["status"] == "sent" and row["lease_owner"] is None and row["attempt_count"] == 1
    assert row["resolved_locale"] == "pt-BR"  # the outcome carries the locale of the content sent
    [a] = h.attempts(database, "d1")
    assert a["attempt_no"] == 1 and a["status"] == "provider_accepted" and a["instance_id"] == "me"
    assert a["started_at"] == c.lease_started_at and a["duration_ms"] == 12
    assert a["finished_at"] - a["started_at"] == timedelta(milliseconds=12)
    # the same outcome again: the fence no longer holds, nothing doubles
    assert await finish(db, [outcome(c)]) == set()
    assert len(h.attempts(database, "d1")) == 1


async def test_nul_in_a_provider_reply_cannot_fail_a_batch(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("z1"), h.delivery("z2")])
    c1, c2 = await claim(db, 2)
    odd = outcome(c1, "failed", "provider_rejected", status_reason="550 odd\0reply",
                  provider_summary="550 odd\0reply", details={"reply": {"text": "odd\0reply"}, "k\0": ["\0"]})
    assert await finish(db, [odd, outcome(c2)]) == {"z1", "z2"}
    [a] = h.attempts(database, "z1")
    assert a["provider_summary"] == "550 oddreply" and a["details"] == {"reply": {"text": "oddreply"}, "k": [""]}


async def test_retry_and_dead_letter_fields(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("r1"), h.delivery("r2")])
    c1, c2 = await claim(db, 2)
    before = h.query(database, "SELECT now() AS t")[0]["t"]
    done = await finish(db, [
        outcome(c1, "rendered", "provider_deferred", status_reason="451 later", provider_summary="451 later",
                retry_ms=60_000, ladder_step=1),
        outcome(c2, "dead_letter", "timed_out", status_reason="timed out", provider_summary="timed out",
                dead_reason="retry ladder exhausted after 1 attempt: timed out"),
    ])
    assert done == {"r1", "r2"}
    rows = h.deliveries(database, ["r1", "r2"])
    r1 = rows["r1"]
    assert r1["status"] == "rendered" and r1["ladder_step"] == 1 and r1["status_reason"] == "451 later"
    assert timedelta(seconds=59) < r1["next_attempt_at"] - before < timedelta(seconds=61)
    assert r1["schedule_entered_at"] >= before
    r2 = rows["r2"]
    assert r2["status"] == "dead_letter" and r2["next_attempt_at"] is None
    dl = h.query(database, "SELECT * FROM mail.dead_letters")
    reason = "retry ladder exhausted after 1 attempt: timed out"
    assert [(d["delivery_id"], d["reason"]) for d in dl] == [("r2", reason)]
    # The next claim of r1 reuses the stored content and counts the next attempt.
    h.query(database, "UPDATE mail.deliveries SET next_attempt_at = now() WHERE delivery_id = 'r1' RETURNING 1")
    [again] = await claim(db, 5)
    assert again.delivery_id == "r1" and again.rendered and again.subject == "Subject r1"
    assert again.attempt_count == 1 and again.ladder_step == 1
    assert again.resolved_locale == "en"  # from the stored content
    assert await finish(db, [outcome(again)]) == {"r1"}
    assert [a["attempt_no"] for a in h.attempts(database, "r1")] == [1, 2]


async def test_release_keeps_reason_and_schedule_age(db: Database, database: str) -> None:
    from mailtrio.workers import release

    h.insert(database, [h.delivery("k1")])
    h.query(database, "UPDATE mail.deliveries SET status_reason = 'earlier', "
                      "schedule_entered_at = now() - interval '1 hour' WHERE delivery_id = 'k1' RETURNING 1")
    [c] = await claim(db, 1)
    assert await finish(db, [release(c)]) == {"k1"}
    row = h.deliveries(database, ["k1"])["k1"]
    assert row["status"] == "rendered" and row["status_reason"] == "earlier" and row["attempt_count"] == 0
    assert row["next_attempt_at"] is not None and row["lease_owner"] is None
    assert row["schedule_entered_at"] < datetime.now(row["schedule_entered_at"].tzinfo) - timedelta(minutes=59)
    assert h.attempts(database, "k1") == []


async def test_rescue_expired_leases_exactly_once(db: Database, database: str) -> None:
    h.insert(database, [h.delivery(f"x{i}") for i in range(30)] + [h.delivery("live")])
    dead = await claim(db, 30, owner="dead-instance", lease=0.0)
    assert len(dead) == 30
    h.query(database, "UPDATE mail.payloads SET subject = NULL, text_body = NULL, html_body = NULL, "
                      "rendered_at = NULL WHERE delivery_id = 'x0' RETURNING 1")
    assert [c.delivery_id for c in await claim(db, 1, owner="live-instance", lease=300.0)] == ["live"]
    results: list[list[dict[str, object]]] = []

    async def rescuer(name: str) -> None:
        results.append(await db.run(lambda conn: store.rescue_expired(conn, rescuer=name, limit=7)))

    for _ in range(3):
        async with trio.open_nursery() as n:
            for k in range(3):
                n.start_soon(rescuer, f"rescuer-{k}")
    rescued = [str(r["delivery_id"]) for batch in results for r in batch]
    assert sorted(rescued) == sorted(c.delivery_id for c in dead)  # each exactly once, not the live one
    rows = h.deliveries(database)
    assert rows["live"]["status"] == "sending"
    assert rows["x0"]["status"] == "queued"  # no stored content: back to queued
    assert all(rows[f"x{i}"]["status"] == "rendered" for i in range(1, 30))
    # a rescued render tells the delivery its locale; no render, no locale
    assert rows["x0"]["resolved_locale"] is None
    assert all(rows[f"x{i}"]["resolved_locale"] == "en" for i in range(1, 30))
    for i in range(30):
        r = rows[f"x{i}"]
        assert r["next_attempt_at"] is not None and r["lease_owner"] is None and r["attempt_count"] == 1
        [a] = h.attempts(database, f"x{i}")
        assert a["status"] == "interrupted" and a["instance_id"] == "dead-instance"
        assert a["details"]["rescued_by"].startswith("rescuer-")
    # a late outcome from the dead instance cannot land any more
    assert await finish(db, [outcome(dead[1])], owner="dead-instance") == set()


async def test_recorder_isolates_a_bad_outcome(db: Database, database: str) -> None:
    from mailtrio.workers import Recorder

    h.insert(database, [h.delivery("one"), h.delivery("two")])
    good, bad = await claim(db, 2)
    recorder = Recorder(db, "me", backlog=10)
    results: dict[str, bool] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        await recorder.finish(outcome(good), lambda ok: results.__setitem__("good", ok))
        # violates the CHECK constraint on deliveries.status: the batch fails, then each is retried
        await recorder.finish(outcome(bad, status="bogus"), lambda ok: results.__setitem__("bad", ok))
        await recorder.close()
    assert results == {"good": True, "bad": False}
    rows = h.deliveries(database)
    assert (rows[good.delivery_id]["status"], rows[bad.delivery_id]["status"]) == ("sent", "sending")


async def test_a_large_render_is_prepared_off_the_event_loop(db: Database, database: str) -> None:
    """What a claimed batch has to render beyond OFF_LOOP_BYTES is prepared in a worker thread;
    an ordinary batch inline, on the event loop's thread."""
    import threading

    big = "x" * (store.OFF_LOOP_BYTES + 1)
    h.insert(database, [h.delivery("small", variables={"code": "1"})])
    threads: list[int] = []

    def recording(claims: list[store.Claim], broken: list[store.Undecodable] | None = None) -> Prep:
        threads.append(threading.get_ident())
        return render_all(claims, broken)

    async def claim_with(limit: int) -> Prep:
        prep, _ = await db.run(lambda conn: store.claim_batch(conn, owner="me", lease_seconds=30, limit=limit,
                                                              prepare=recording))
        return prep

    small = await claim_with(5)
    assert [c.delivery_id for c in small.claims] == ["small"] and not store.render_off_loop(small.claims)
    h.insert(database, [h.delivery("big", variables={"code": big})])
    large = await claim_with(5)
    assert [c.delivery_id for c in large.claims] == ["big"] and store.render_off_loop(large.claims)
    assert large.claims[0].payload_bytes > store.OFF_LOOP_BYTES
    main = threading.get_ident()
    assert threads[0] == main and threads[1] != main
    # the content prepared in the thread was stored under the lease like any other
    assert h.deliveries(database, ["big"])["big"]["status"] == "sending"
    assert large.stored == {"big"}


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20))
def test_batch_json_is_the_stdlibs(value: object) -> None:
    """The batch parameters' fast JSON text (orjson, with the stdlib as fallback) reads back as the
    stdlib's own text does, whatever the values (big integers, surrogates and NULs included)."""
    reference = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(store._dumps(value)) == json.loads(reference)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**17, max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


@given(_JSON_VALUES, st.booleans())
def test_claimed_json_decodes_as_the_stdlib_does(value: object, spaced: bool) -> None:
    """A claimed row's JSON columns (orjson, with the stdlib for long integer runs or whatever
    orjson refuses) decode to what the stdlib makes of them, down to int versus float."""
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": ") if spaced else (",", ":"))
    decoded, reference = store._json(text), json.loads(text)
    assert decoded == reference
    assert repr(decoded) == repr(reference)


def test_claimed_json_keeps_integers_beyond_64_bits_exact() -> None:
    assert store._json('{"n": 123456789012345678901234567890}') == {"n": 123456789012345678901234567890}
    assert store._json('[18446744073709551616, 1e400]') == [18446744073709551616, float("inf")]
    assert store._json(None) is None


async def test_the_content_write_is_one_statement_that_skips_the_wal_flush_wait(db: Database, database: str) -> None:
    """store_content turns synchronous_commit off for its own transaction only (set_config, local),
    so it can run alone in autocommit; contents alone are written in that one statement."""
    h.insert(database, [h.delivery("c-1"), h.delivery("c-2")])
    prep, _ = await db.run(lambda conn: store.claim_batch(conn, owner="me", lease_seconds=30, limit=5,
                                                          prepare=render_all))
    assert prep.stored == {"c-1", "c-2"} and not prep.failures
    h.insert(database, [h.delivery("c-3")])
    claims = await claim_only(db)

    async def inside(conn: object) -> tuple[str, str]:
        async with conn.transaction():  # type: ignore[attr-defined]
            rows = store._batch_params("me", render_all(claims).contents)
            await conn.execute(store.q("store_content"), rows)  # type: ignore[attr-defined]
            cur = await conn.execute("SHOW synchronous_commit")  # type: ignore[attr-defined]
            during = (await cur.fetchone())["synchronous_commit"]
        cur = await conn.execute("SHOW synchronous_commit")  # type: ignore[attr-defined]
        return during, (await cur.fetchone())["synchronous_commit"]

    assert await db.run(inside) == ("off", "on")
    payload = h.query(database, "SELECT subject FROM mail.payloads WHERE delivery_id = 'c-3'")[0]
    assert payload["subject"] == "Subject c-3"


async def claim_only(db: Database) -> list[store.Claim]:
    claims, _, _ = await db.run(lambda conn: store.claim_due_and_next(conn, owner="me", lease_seconds=30, limit=5))
    return claims


async def _generic_finish_plan(conn: Conn) -> str:
    """The generic plan (the one PostgreSQL caches for a prepared statement) of finish_attempts,
    made now, with the statistics of this moment."""
    sql = q("finish_attempts").replace("%(rows)s", "$1").replace("%(ids)s", "$2").replace("%(owner)s", "$3")
    await conn.execute(f"PREPARE mt_generic_finish (jsonb, text[], text) AS {sql}")
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cur = await conn.execute("EXPLAIN EXECUTE mt_generic_finish('[]', '{}', 'me')")
            return "\n".join(str(next(iter(row.values()))) for row in await cur.fetchall())
    finally:
        await conn.execute("DEALLOCATE mt_generic_finish")


async def test_engine_plans_find_a_batch_by_index_however_small_the_table_was(database: str) -> None:
    """A plan made while mail.deliveries is nearly empty (a new database, a table just emptied by
    retention) is kept for the statement's life: on the engine's connections it still finds a
    batch's rows through the primary key, so an outcome's write does not grow with the table
    (store.INDEX_PLAN_SETTINGS). The planner's own choice on such a table, seen on a connection
    without the setting, is to scan the whole table."""
    from mailtrio import bridge

    plans: dict[bool, str] = {}
    async with bridge.open_loop():
        for index_plans in (True, False):
            d = Database(database, 1, index_plans=index_plans)
            await d.open()
            try:
                plans[index_plans] = await d.run(_generic_finish_plan)
            finally:
                await d.close()
    assert "Index Cond: (delivery_id = ANY ($2))" in plans[True], plans[True]
    assert "Seq Scan on deliveries" not in plans[True], plans[True]
    assert "Seq Scan on deliveries" in plans[False], plans[False]
