"""Batched deletes of the SQL retention worker, each batch one transaction under an advisory lock."""

from __future__ import annotations

from typing import Literal

from mailtrio.store import Conn, Database
from mailtrio.store.queries import q

# pg_try_advisory_xact_lock key of the retention worker (the bytes of "mailtret" as a bigint):
# one instance deletes at a time.
RETENTION_LOCK_ID = 0x6D61696C74726574

Kind = Literal["deliveries", "malformed_commands", "idempotency_reservations", "delivery_events"]

_QUERIES: dict[Kind, str] = {
    "deliveries": "retention_delete_deliveries",
    "malformed_commands": "retention_delete_malformed",
    "idempotency_reservations": "retention_delete_reservations",
    # published outbox rows (their period is MAIL_EVENT_OUTBOX_RETENTION)
    "delivery_events": "retention_delete_published_events",
}


async def delete_batch(db: Database, kind: Kind, *, period_s: float, batch: int) -> int | None:
    """Delete at most `batch` expired rows of `kind` in one transaction; None if the lock is taken."""

    async def _batch(conn: Conn) -> int | None:
        cur = await conn.execute(q("retention_try_lock"), {"lock_id": RETENTION_LOCK_ID})
        row = await cur.fetchone()
        if row is None or not row["locked"]:
            return None
        cur = await conn.execute(q(_QUERIES[kind]), {"period_s": period_s, "batch": batch})
        return cur.rowcount

    return await db.transaction(_batch)
