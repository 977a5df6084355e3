"""Reads and operator verbs for the internal HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mailtrio.store import Conn, Database
from mailtrio.store.queries import q


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC with millisecond precision (CONTRACT §7)."""
    if value is None:
        return None
    from datetime import UTC

    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delivery_json(row: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    recipients = row["recipients"] or {}
    return {
        "delivery_id": row["delivery_id"],
        "source": row["source"],
        "status": row["status"],
        "status_reason": row["status_reason"],
        "payload_mode": row["payload_mode"],
        "template_id": row["template_id"],
        "locale": row["locale"],
        "resolved_locale": row["resolved_locale"],
        "recipients": {
            "to": recipients.get("to", []),
            "cc": recipients.get("cc", []),
            "bcc": recipients.get("bcc", []),
        },
        "send_at": rfc3339(row["send_at"]),
        "next_attempt_at": rfc3339(row["next_attempt_at"]),
        "attempt_count": row["attempt_count"],
        "message_id": row["message_id"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "attempts": [
            {
                "attempt_no": a["attempt_no"],
                "status": a["status"],
                "started_at": rfc3339(a["started_at"]),
                "finished_at": rfc3339(a["finished_at"]),
                "duration_ms": a["duration_ms"],
                "provider_summary": a["provider_summary"],
                "instance_id": a["instance_id"],
            }
            for a in attempts
        ],
        "dead_letter": (
            {"reason": row["dl_reason"], "created_at": rfc3339(row["dl_created_at"])}
            if row.get("dl_reason") is not None
            else None
        ),
    }


async def get_delivery(db: Database, delivery_id: str) -> dict[str, Any] | None:
    async def _get(conn: Conn) -> dict[str, Any] | None:
        cur = await conn.execute(q("delivery_get"), {"delivery_id": delivery_id})
        row = await cur.fetchone()
        if row is None:
            return None
        cur = await conn.execute(q("attempts_for_delivery"), {"delivery_id": delivery_id})
        return delivery_json(row, await cur.fetchall())

    return await db.run(_get)
