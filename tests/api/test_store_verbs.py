"""The operator verbs' database transitions, without a running engine to claim what they schedule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailtrio import bridge
from mailtrio.store import Database
from mailtrio.store import api as store_api
from tests.api.conftest import insert_attempt, insert_dead_letter, insert_delivery, insert_payload

Conn = psycopg.Connection[dict[str, Any]]

STATE = ("SELECT status, status_reason, ladder_step, attempt_count, next_attempt_at, schedule_entered_at, "
         "updated_at, (SELECT count(*) FROM mail.dead_letters l WHERE l.delivery_id = d.delivery_id) AS dl "
         "FROM mail.deliveries d WHERE delivery_id = %s")


@pytest.fixture
async def db(database: str) -> AsyncIterator[Database]:
    async with bridge.open_loop():
        opened = Database(database, 2)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


async def test_retry_gives_a_fresh_ladder_and_drops_the_dead_letter(db: Database, sql: Conn) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=2)
    dead = insert_delivery(sql, status="dead_letter", status_reason="421 busy", attempt_count=6, ladder_step=5,
                           created_at=long_ago, schedule_entered_at=long_ago)
    insert_payload(sql, dead, rendered=True)
    insert_attempt(sql, dead, 1, "provider_deferred", "421 busy")
    insert_dead_letter(sql, dead, "421 busy")
    failed = insert_delivery(sql, status="failed", status_reason="554 rejected", ladder_step=0,
                             created_at=long_ago)
    insert_payload(sql, failed, rendered=False)

    result = await store_api.retry_delivery(db, dead)
    assert result.outcome == "done" and result.delivery is not None
    row = sql.execute(STATE, (dead,)).fetchone()
    assert row is not None
    assert row["status"] == "rendered" and row["status_reason"] is None
    assert row["ladder_step"] == 0 and row["attempt_count"] == 6 and row["dl"] == 0
    # due now, and it (re-)entered the schedule now: the age metric starts over
    assert row["next_attempt_at"] == row["schedule_entered_at"] == row["updated_at"]
    assert datetime.now(UTC) - row["next_attempt_at"] < timedelta(seconds=30)
    assert sql.execute("SELECT count(*) AS n FROM mail.attempts WHERE delivery_id = %s", (dead,)).fetchone() == {"n": 1}

    result = await store_api.retry_delivery(db, failed)
    assert result.outcome == "done"
    assert sql.execute(STATE, (failed,)).fetchone()["status"] == "queued"  # type: ignore[index]

    again = await store_api.retry_delivery(db, dead)
    assert (again.outcome, again.status) == ("conflict", "rendered")
    assert (await store_api.retry_delivery(db, "missing")).outcome == "not_found"


async def test_cancel_takes_the_delivery_off_the_schedule(db: Database, sql: Conn) -> None:
    did = insert_delivery(sql, status="rendered")
    result = await store_api.cancel_delivery(db, did)
    assert result.outcome == "done"
    row = sql.execute(STATE, (did,)).fetchone()
    assert row is not None
    assert row["status"] == "cancelled" and row["status_reason"] == "cancelled by operator"
    assert row["next_attempt_at"] is None
    assert (await store_api.cancel_delivery(db, did)).status == "cancelled"
