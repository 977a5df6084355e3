"""What keeps the outbox cheap (sql/00009_delivery_events_cost.sql, events_fetch) against a real
database: the outcome trigger finds the attempt by primary key however small mail.attempts
looked when its plan was made, a claim writes nothing, and the publisher's entry text is the
fields plus event_id, event and occurred_at, whatever the fields hold."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailtrio.store import Database
from mailtrio.store import engine as store
from mailtrio.store.events import OutboxConnection
from mailtrio.store.queries import q
from tests.engine import helpers as h


def _finish_params(claims: list[dict[str, Any]]) -> dict[str, Any]:
    items = [
        store.Finish(
            delivery_id=c["delivery_id"], lease_started_at=c["lease_started_at"], status="sent",
            status_reason=None, attempt_status="provider_accepted", elapsed_ms=5,
            provider_summary="250 2.0.0 Ok", details=None, retry_ms=None, ladder_step=0,
        ).as_json()
        for c in claims
    ]
    return {"owner": "me", "rows": json.dumps(items), "ids": [c["delivery_id"] for c in claims]}


def test_the_attempt_is_found_by_primary_key_after_the_table_looked_empty(database: str) -> None:
    """The trigger's plans live as long as the session. Made right after mail.attempts was
    vacuumed empty, a plan that could scan the table would scan it for every later outcome."""
    ids = h.insert(database, [h.delivery(f"pk{i}") for i in range(4)])
    with psycopg.connect(database, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("VACUUM ANALYZE mail.attempts")
        with conn.transaction():
            claims = conn.execute(q("claim_due").replace("%(limit)s", "10"),
                                  {"owner": "me", "lease_seconds": 30}).fetchall()
            assert sorted(c["delivery_id"] for c in claims) == sorted(ids)
            # the claim: no event, and no look at mail.attempts
            assert conn.execute("SELECT count(*) AS n FROM mail.delivery_events "
                                "WHERE event <> 'accepted'").fetchone() == {"n": 0}
            done = conn.execute(q("finish_attempts"), _finish_params(claims)).fetchall()
            assert len(done) == len(ids)
            scans = conn.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                                 "WHERE relid = 'mail.attempts'::regclass").fetchone()
    assert scans is not None and scans["seq_scan"] == 0 and scans["idx_scan"] >= len(ids), scans
    sent = h.query(database, "SELECT delivery_id, fields FROM mail.delivery_events WHERE event = 'sent'")
    assert sorted(e["delivery_id"] for e in sent) == sorted(ids)
    for e in sent:
        assert e["fields"]["attempt_status"] == "provider_accepted"
        assert e["fields"]["reason"] == "250 2.0.0 Ok" and e["fields"]["attempt_no"] == "1"


async def test_the_entry_is_the_fields_with_event_id_event_and_occurred_at(db: Database, database: str) -> None:
    odd = {"delivery_id": "x", "reason": 'a "quoted" reply\\ with ü, \u2028 and a\nnewline', "{": "}"}
    h.query(database, "INSERT INTO mail.delivery_events (event, delivery_id, fields) "
                      "VALUES ('rejected', NULL, '{}'), ('failed', 'x', %s) RETURNING seq", [json.dumps(odd)])
    expected = {
        r["seq"]: r["entry"] for r in h.query(
            database,
            "SELECT seq, fields || jsonb_build_object('event_id', event_id::text, 'event', event, "
            "'occurred_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) "
            "AS entry FROM mail.delivery_events")
    }
    outbox = OutboxConnection(db)
    try:
        assert await outbox.try_lock()
        fetched = await outbox.fetch(10)
    finally:
        await outbox.close()
    assert [e.event for e in fetched] == ["rejected", "failed"]
    for e in fetched:
        assert json.loads(e.entry) == expected[e.seq]
    assert set(json.loads(fetched[0].entry)) == {"event_id", "event", "occurred_at"}
    assert json.loads(fetched[1].entry)["reason"] == odd["reason"]
