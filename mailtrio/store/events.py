"""Store code of the event outbox (sql/00008_delivery_events.sql, sql/00009_delivery_events_cost.sql,
sql/queries/events.sql).

The outbox rows are written by triggers, in the transaction of the change they describe. This
module reads them for the publisher, on a connection of its own that holds the publisher's
session-level advisory lock (`OutboxConnection`), and gives the operator's view of the outbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio
from psycopg.rows import tuple_row

from mailtrio.store import Conn, Database
from mailtrio.store.queries import q

# pg_advisory_lock key of the event publisher (the bytes of "mailevnt" as a bigint): one
# instance publishes at a time.
PUBLISHER_LOCK_ID = 0x6D61696C65766E74

# Bound on one statement of the publisher's connection (a network wait).
CALL_TIMEOUT = 10.0


class OutboxEvent(NamedTuple):
    """One unpublished event as the publisher needs it (a plain tuple: cheap by the thousand)."""

    seq: int
    event: str
    # the stream entry as a JSON object of string fields (event_id, event, occurred_at included)
    entry: str


class OutboxConnection:
    """A dedicated connection for the publisher: the advisory lock lives and dies with it, and
    every read and mark of the outbox goes through it, so a publisher that lost its connection
    (and with it the lock) can no longer mark anything."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn: Conn | None = None

    async def _call(self, sql: str, params: dict[str, Any], *, tuples: bool = False) -> list[Any]:
        conn = self.conn
        if conn is None:
            raise RuntimeError("the outbox connection is not open")

        async def _execute() -> list[Any]:
            cur = conn.cursor(row_factory=tuple_row) if tuples else conn.cursor()
            await cur.execute(sql, params)
            return list(await cur.fetchall()) if cur.description else []

        with trio.fail_after(CALL_TIMEOUT):
            return await _execute()

    async def try_lock(self) -> bool:
        """Open the connection if needed and try to take the publisher's lock (never waits)."""
        if self.conn is None:
            self.conn = await self.db.connect_direct()
        rows = await self._call(q("events_try_lock"), {"lock_id": PUBLISHER_LOCK_ID})
        return bool(rows and rows[0]["locked"])

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        rows = await self._call(q("events_fetch"), {"limit": limit}, tuples=True)
        return [OutboxEvent._make(r) for r in rows]

    async def mark_published(self, seqs: Sequence[int]) -> None:
        await self._call(q("events_mark_published"), {"seqs": list(seqs)})

    async def close(self, *, within: float = 2.0) -> None:
        """Release the lock (closing the session releases it too) and close the connection."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with trio.move_on_after(within) as scope:
            scope.shield = True
            try:
                await conn.close()
            except Exception:  # a broken connection is closed all the same
                pass


@dataclass(frozen=True)
class OutboxSummary:
    depth: int
    oldest_age_ms: int
    publisher: str | None


async def outbox_gauges(db: Database) -> tuple[int, int]:
    """Unpublished events and the age in ms of the oldest one (0 when none)."""

    async def _gauges(conn: Conn) -> tuple[int, int]:
        cur = await conn.execute(q("events_outbox_gauges"))
        row = await cur.fetchone()
        return (int(row["depth"]), int(row["oldest_age_ms"])) if row else (0, 0)

    return await db.run(_gauges)


async def outbox_summary(db: Database) -> OutboxSummary:
    """The gauges and the instance publishing now (None when no instance holds the lock)."""

    async def _summary(conn: Conn) -> OutboxSummary:
        cur = await conn.execute(q("events_outbox_gauges"))
        row = await cur.fetchone()
        cur = await conn.execute(q("events_publisher"), {"lock_id": PUBLISHER_LOCK_ID})
        holder = await cur.fetchone()
        name = holder["application_name"] if holder else None
        if name is not None and name.startswith("mailtrio:"):
            name = name[len("mailtrio:"):]
        return OutboxSummary(
            depth=int(row["depth"]) if row else 0,
            oldest_age_ms=int(row["oldest_age_ms"]) if row else 0,
            publisher=name or None,
        )

    return await db.run(_summary)
