"""The SQL retention worker: exactly the old terminal rows go, in bounded batches, one instance at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from mailtrio import bridge
from mailtrio.retention import BATCH_SIZE, Retention
from mailtrio.store import Database
from mailtrio.store.retention import RETENTION_LOCK_ID
from tests.api.conftest import (
    TERMINAL,
    delivery_row,
    insert_attempt,
    insert_dead_letter,
    insert_deliveries,
    insert_malformed,
    insert_payload,
    insert_reservation,
    settings_for,
)
from tests.support.serve import ServeProcess

Conn = psycopg.Connection[dict[str, Any]]
PERIOD = timedelta(hours=720)


@pytest.fixture
async def db(database: str) -> AsyncIterator[Database]:
    async with bridge.open_loop():
        database_ = Database(database, 2)
        await database_.open()
        try:
            yield database_
        finally:
            await database_.close()


def ids(conn: Conn, table: str, column: str = "delivery_id") -> set[Any]:
    return {r[column] for r in conn.execute(f"SELECT {column} FROM mail.{table}").fetchall()}


async def test_deletes_exactly_what_is_old_and_terminal(database: str, db: Database, sql: Conn) -> None:
    now = datetime.now(UTC)
    old = now - PERIOD - timedelta(hours=1)
    recent = now - PERIOD + timedelta(hours=1)
    rows = []
    for status in TERMINAL:
        rows.append(delivery_row(status=status, created_at=old - timedelta(days=1), updated_at=old))
        rows.append(delivery_row(status=status, created_at=old - timedelta(days=1), updated_at=recent))
    # waiting or in flight: never deleted, however old
    for status in ("queued", "rendered", "sending"):
        rows.append(delivery_row(status=status, created_at=old - timedelta(days=9), updated_at=old))
    insert_deliveries(sql, rows)
    expired = {r["delivery_id"] for r in rows if r["status"] in TERMINAL and r["updated_at"] == old}
    for r in rows:
        if r["status"] == "dead_letter":
            insert_payload(sql, r["delivery_id"], rendered=True)
            insert_attempt(sql, r["delivery_id"], 1, "transport_failed", "refused")
            insert_dead_letter(sql, r["delivery_id"], "refused")
    old_malformed = insert_malformed(sql, "invalid_json", received_at=old)
    new_malformed = insert_malformed(sql, "invalid_json", received_at=recent)
    gone_key = insert_reservation(sql, expires_at=now - timedelta(seconds=1))
    kept_key = insert_reservation(sql, expires_at=now + timedelta(hours=1))

    retention = Retention(settings_for(database), db)
    counts = await retention.run_once()

    assert (counts.deliveries, counts.malformed_commands, counts.idempotency_reservations) == (5, 1, 1)
    assert counts.batches == 3 and not counts.skipped
    remaining = ids(sql, "deliveries")
    assert remaining == {r["delivery_id"] for r in rows} - expired
    # payloads, attempts and dead letters went with their delivery, and only those
    for table in ("payloads", "attempts", "dead_letters"):
        left = ids(sql, table)
        assert len(left) == 1 and left <= remaining, table
    assert ids(sql, "malformed_commands", "id") == {new_malformed} != {old_malformed}
    assert ids(sql, "idempotency_reservations", "idempotency_key") == {kept_key} != {gone_key}

    again = await retention.run_once()
    assert (again.deliveries, again.malformed_commands, again.idempotency_reservations, again.batches) == (0, 0, 0, 0)


async def test_batches_are_bounded(database: str, db: Database, sql: Conn) -> None:
    old = datetime.now(UTC) - PERIOD - timedelta(days=1)
    insert_deliveries(sql, [delivery_row(status="sent", updated_at=old - timedelta(seconds=i))
                                 for i in range(2345)])
    counts = await Retention(settings_for(database), db).run_once()
    assert counts.deliveries == 2345
    assert counts.batches == 3  # 1,000 + 1,000 + 345

    insert_deliveries(sql, [delivery_row(status="cancelled", updated_at=old) for _ in range(250)])
    small = await Retention(settings_for(database), db, batch_size=100).run_once()
    assert small.deliveries == 250 and small.batches == 3
    assert ids(sql, "deliveries") == set()

    with pytest.raises(ValueError):
        Retention(settings_for(database), db, batch_size=BATCH_SIZE + 1)


async def test_skips_while_another_instance_holds_the_lock(database: str, db: Database, sql: Conn) -> None:
    old = datetime.now(UTC) - PERIOD - timedelta(days=1)
    insert_deliveries(sql, [delivery_row(status="sent", updated_at=old) for _ in range(3)])
    retention = Retention(settings_for(database), db)
    with psycopg.connect(database) as other:  # a transaction of another instance holds the lock
        other.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK_ID,))
        counts = await retention.run_once()
        assert counts.skipped and counts.deliveries == 0
        assert len(ids(sql, "deliveries")) == 3
    counts = await retention.run_once()  # the other transaction ended: the lock is free
    assert not counts.skipped and counts.deliveries == 3


def test_the_service_runs_retention_every_interval(service_env: dict[str, str]) -> None:
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    old = datetime.now(UTC) - timedelta(hours=2)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        insert_deliveries(conn, [delivery_row(status="sent", updated_at=old) for _ in range(4)])
        fresh = insert_deliveries(conn, [delivery_row(status="sent")])
        env = dict(service_env, MAIL_RETENTION_PERIOD="1h", MAIL_RETENTION_INTERVAL="500ms")
        with ServeProcess(env) as proc:
            proc.wait_ready()
            started = proc.wait_for("sql retention worker started")
            assert started["interval_s"] == 0.5 and started["period_s"] == 3600
            first = proc.wait_for("sql retention run")
            assert first["deliveries"] == 4 and first["skipped"] is False
            # rows that age past the period later go on a later run
            insert_deliveries(conn, [delivery_row(status="failed", updated_at=old) for _ in range(2)])
            runs = []
            for n in range(2, 60):
                runs.append(proc.wait_for("sql retention run", count=n))
                if runs[-1]["deliveries"]:
                    break
            assert runs[-1]["deliveries"] == 2
            assert ids(conn, "deliveries") == set(fresh)
            assert proc.stop() == 0
        assert "sql retention worker stopped" in proc.events()
