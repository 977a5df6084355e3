"""The outbox triggers against a real database: which change writes which event, with which
fields, in the transaction of the change (the engine's and the operator's own statements)."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg

from mailtrio.store import Database
from mailtrio.store import api as store_api
from mailtrio.store import engine as store
from tests.engine import helpers as h

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def events(dsn: str, delivery_id: str | None = None) -> list[dict[str, Any]]:
    if delivery_id is None:
        return h.query(dsn, "SELECT * FROM mail.delivery_events ORDER BY seq")
    return h.query(dsn, "SELECT * FROM mail.delivery_events WHERE delivery_id = %s ORDER BY seq", [delivery_id])


def kinds(dsn: str, delivery_id: str) -> list[str]:
    return [e["event"] for e in events(dsn, delivery_id)]


async def claim(db: Database, owner: str = "me", lease: float = 30.0) -> dict[str, store.Claim]:
    claims = await db.run(lambda conn: store.claim_due(conn, owner=owner, lease_seconds=lease, limit=50))
    return {c.delivery_id: c for c in claims}


def finish(c: store.Claim, status: str, attempt: str | None, summary: str | None, **kw: Any) -> store.Finish:
    fields: dict[str, Any] = dict(
        delivery_id=c.delivery_id, lease_started_at=c.lease_started_at, status=status,
        status_reason=None if status == "sent" else summary, attempt_status=attempt, elapsed_ms=5,
        provider_summary=summary, details=None, retry_ms=None, ladder_step=c.ladder_step,
    )
    fields.update(kw)
    return store.Finish(**fields)


async def record(db: Database, items: list[store.Finish], owner: str = "me") -> set[str]:
    return await db.run(lambda conn: store.finish_attempts(conn, owner=owner, items=items))


async def test_each_transition_writes_its_event(db: Database, database: str) -> None:
    from mailtrio.workers import release

    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ids = ["ok", "later", "rel", "bad", "supp", "dead"]
    h.insert(database, [h.delivery(i, traceparent=tp if i == "ok" else None) for i in ids])
    assert [e["event"] for e in events(database)] == ["accepted"] * len(ids)
    accepted = events(database, "ok")[0]
    assert accepted["fields"] == {
        "delivery_id": "ok", "source": "notification", "idempotency_key": "key-ok", "status": "queued",
        "attempt_no": "0", "traceparent": tp, "next_attempt_at": accepted["fields"]["next_attempt_at"],
    }
    assert TIME_RE.match(accepted["fields"]["next_attempt_at"])
    assert accepted["published_at"] is None

    c = await claim(db)
    assert set(c) == set(ids)
    assert len(events(database)) == len(ids)  # a claim is no event
    done = await record(db, [
        finish(c["ok"], "sent", "provider_accepted", "250 2.0.0 queued as 1"),
        finish(c["later"], "rendered", "provider_deferred", "451 4.3.0 try later", retry_ms=60_000, ladder_step=1),
        release(c["rel"]),
        finish(c["bad"], "failed", "provider_rejected", "550 5.1.1 unknown"),
        finish(c["supp"], "suppressed", "provider_rejected", "550 5.7.1 suppressed"),
        finish(c["dead"], "dead_letter", "timed_out", "timed out",
               dead_reason="retry ladder exhausted after 1 attempt: timed out"),
    ])
    assert done == set(ids)
    assert kinds(database, "rel") == ["accepted"]  # a released claim: no attempt, no event
    [_, sent] = events(database, "ok")
    assert sent["event"] == "sent"
    assert sent["fields"] == {"delivery_id": "ok", "source": "notification", "idempotency_key": "key-ok",
                              "status": "sent", "attempt_no": "1", "reason": "250 2.0.0 queued as 1",
                              "attempt_status": "provider_accepted", "traceparent": tp}
    [_, deferred] = events(database, "later")
    f = deferred["fields"]
    assert deferred["event"] == "deferred" and f["status"] == "rendered" and f["attempt_no"] == "1"
    assert f["reply"] == "451 4.3.0 try later" and f["reason"] == "451 4.3.0 try later"
    assert f["attempt_status"] == "provider_deferred" and TIME_RE.match(f["next_attempt_at"])
    row = h.deliveries(database, ["later"])["later"]
    assert f["next_attempt_at"] == store_api.rfc3339(row["next_attempt_at"])
    assert kinds(database, "bad") == ["accepted", "failed"]
    assert events(database, "bad")[1]["fields"]["reason"] == "550 5.1.1 unknown"
    assert kinds(database, "supp") == ["accepted", "suppressed"]
    assert kinds(database, "dead") == ["accepted", "dead_letter"]

    # operator verbs: retry of failed and dead_letter, cancel of a waiting delivery
    assert (await store_api.retry_delivery(db, "bad")).outcome == "done"
    assert (await store_api.retry_delivery(db, "dead")).outcome == "done"
    assert (await store_api.cancel_delivery(db, "rel")).outcome == "done"
    retried = events(database, "bad")[-1]
    assert retried["event"] == "retried" and retried["fields"]["previous_status"] == "failed"
    assert retried["fields"]["status"] in ("queued", "rendered") and TIME_RE.match(retried["fields"]["next_attempt_at"])
    assert kinds(database, "dead") == ["accepted", "dead_letter", "retried"]
    assert kinds(database, "rel") == ["accepted", "cancelled"]
    assert events(database, "rel")[-1]["fields"]["reason"] == "cancelled by operator"
    # refused verbs change nothing and write nothing
    assert (await store_api.cancel_delivery(db, "ok")).outcome != "done"
    assert kinds(database, "ok") == ["accepted", "sent"]
    # every event has its own id
    assert len({e["event_id"] for e in events(database)}) == len(events(database))


async def test_interrupted_attempts_are_deferred_events(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("lost"), h.delivery("stopped")])
    c = await claim(db, owner="dead-instance", lease=0.0)
    rescued = await db.run(lambda conn: store.rescue_expired(conn, rescuer="other", limit=1))
    [lost_id] = [str(r["delivery_id"]) for r in rescued]
    other = "stopped" if lost_id == "lost" else "lost"
    [_, ev] = events(database, lost_id)
    assert ev["event"] == "deferred" and ev["fields"]["attempt_status"] == "interrupted"
    assert ev["fields"]["reason"].startswith("interrupted:") and ev["fields"]["reply"].startswith("interrupted:")
    assert ev["fields"]["attempt_no"] == "1"
    # the shutdown put-back records an interrupted attempt too
    await record(db, [finish(c[other], "rendered", "interrupted", "interrupted: shutdown deadline reached",
                             status_reason="interrupted: the instance stopped mid-attempt", retry_ms=0)],
                 owner="dead-instance")
    [_, ev] = events(database, other)
    assert ev["event"] == "deferred" and ev["fields"]["attempt_status"] == "interrupted"
    assert ev["fields"]["reason"] == "interrupted: the instance stopped mid-attempt"


async def test_repeated_interruptions_dead_letter_with_their_events(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("crashy")])
    for _ in range(2):
        await claim(db, owner="gone", lease=0.0)
        await db.run(lambda conn: store.rescue_expired(conn, rescuer="other", max_interrupted=2))
    assert kinds(database, "crashy") == ["accepted", "deferred", "dead_letter"]
    final = events(database, "crashy")[-1]["fields"]
    assert final["attempt_status"] == "interrupted" and final["attempt_no"] == "2"
    assert final["status"] == "dead_letter" and final["reason"]


async def test_render_failure_is_a_failed_event(db: Database, database: str) -> None:
    h.insert(database, [h.delivery("r")])
    c = await claim(db)
    await record(db, [finish(c["r"], "failed", None, None, status_reason="render_failed: boom")])
    [_, ev] = events(database, "r")
    assert ev["event"] == "failed" and ev["fields"]["reason"] == "render_failed: boom"
    assert ev["fields"]["attempt_no"] == "0" and "attempt_status" not in ev["fields"]


def test_rejected_command_event(database: str) -> None:
    raw = {"delivery_id": "m-1", "source": "authsession", "idempotency_key": "k-1", "payload": "{",
           "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    h.query(database, "INSERT INTO mail.malformed_commands (failure_code, failure_detail, stream_entry_id, "
                      "delivery_id, source, fields) VALUES ('invalid_json', 'payload: not JSON', '1-1', 'm-1', "
                      "'authsession', %s) RETURNING id", [json.dumps(raw)])
    h.query(database, "INSERT INTO mail.malformed_commands (failure_code, failure_detail, stream_entry_id, "
                      "fields) VALUES ('missing_field', 'delivery_id: is required', '1-2', '{}') RETURNING id")
    first, second = events(database)
    assert first["event"] == "rejected" and first["delivery_id"] == "m-1"
    assert first["fields"] == {"delivery_id": "m-1", "source": "authsession", "idempotency_key": "k-1",
                               "reason": "payload: not JSON", "failure_code": "invalid_json",
                               "failure_detail": "payload: not JSON", "traceparent": raw["traceparent"],
                               "stream_entry_id": "1-1"}
    assert second["delivery_id"] is None
    assert second["fields"] == {"reason": "delivery_id: is required", "failure_code": "missing_field",
                                "failure_detail": "delivery_id: is required", "stream_entry_id": "1-2"}


def test_a_rolled_back_change_writes_no_event(database: str) -> None:
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO mail.malformed_commands (failure_code, failure_detail, stream_entry_id, fields) "
                     "VALUES ('invalid_json', 'x', '9-9', '{}')")
        assert conn.execute("SELECT count(*) FROM mail.delivery_events").fetchone() == (1,)
        conn.rollback()
    assert events(database) == []


async def test_final_event_carries_recipient_outcomes_when_the_row_has_them(db: Database, database: str) -> None:
    """The extension point: a `recipient_outcomes` column on deliveries (per-recipient results)
    is carried by the final event as JSON text, without any change to the trigger."""
    h.insert(database, [h.delivery("plain")])
    c = await claim(db)
    await record(db, [finish(c["plain"], "sent", "provider_accepted", "250 ok")])
    assert "recipients" not in events(database, "plain")[-1]["fields"]  # no per-recipient results

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE mail.deliveries ADD COLUMN IF NOT EXISTS recipient_outcomes jsonb")
    h.insert(database, [h.delivery("po", to=("a@example.com", "b@example.com"))])
    c = await claim(db)
    outcomes = [{"email": "a@example.com", "status": "accepted", "reply": "250 ok"},
                {"email": "b@example.com", "status": "refused", "reply": "550 5.1.1 unknown"}]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE mail.deliveries SET recipient_outcomes = %s WHERE delivery_id = 'po'",
                     [json.dumps(outcomes)])
    assert kinds(database, "po") == ["accepted"]  # no status change, no event
    await record(db, [finish(c["po"], "rendered", "provider_deferred", "451 later", retry_ms=0, ladder_step=1)])
    deferred = events(database, "po")[-1]
    assert deferred["event"] == "deferred" and json.loads(deferred["fields"]["recipients"]) == outcomes
    c = await claim(db)
    await record(db, [finish(c["po"], "sent", "provider_accepted", "250 ok")])
    final = events(database, "po")[-1]
    assert final["event"] == "sent"
    assert json.loads(final["fields"]["recipients"]) == outcomes
