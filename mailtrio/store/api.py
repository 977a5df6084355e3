"""Reads and operator verbs for the internal HTTP API.

Listings are keyset-paginated: each returns the items of one page and the key of its last item
when more follow (`(created_at, delivery_id)` for deliveries and dead letters, `id` for malformed
commands); the HTTP layer turns that key into an opaque cursor. Operator verbs are single
conditional statements, so they race safely with the scheduler's claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from mailtrio.enums import (
    ATTEMPT_STATUSES,
    DELIVERY_STATUSES,
    FAILURE_CODES,
    PAYLOAD_MODES,
    SOURCES,
    TERMINAL_STATUSES,
    WAITING_STATUSES,
    DeliveryStatus,
    RecipientStatus,
)
from mailtrio.store import Conn, Database
from mailtrio.store.queries import q

DeliveryKey = tuple[datetime, str]

# The enumerations of the schema's CHECK constraints (CONTRACT §4, §5) live in mailtrio.enums;
# re-exported here for the store's callers.
__all__ = ["ATTEMPT_STATUSES", "DELIVERY_STATUSES", "FAILURE_CODES", "PAYLOAD_MODES", "SOURCES"]


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC with millisecond precision (CONTRACT §7)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _recipients_json(value: dict[str, Any] | None) -> dict[str, list[Any]]:
    recipients = value or {}
    return {part: recipients.get(part, []) for part in ("to", "cc", "bcc")}


# A delivery's status as the outcome of each of its recipients, when none was stored (one
# recipient, or not tried yet).
_RECIPIENT_STATUS_OF = {
    DeliveryStatus.SENT: RecipientStatus.ACCEPTED,
    DeliveryStatus.SUPPRESSED: RecipientStatus.SUPPRESSED,
    DeliveryStatus.FAILED: RecipientStatus.REJECTED,
    DeliveryStatus.DEAD_LETTER: RecipientStatus.DEAD_LETTER,
}
_NOT_FINAL = (DeliveryStatus.QUEUED, DeliveryStatus.RENDERED, DeliveryStatus.SENDING)


def recipient_outcomes_json(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every envelope recipient (to, cc, bcc, each address once) with its outcome: `email`,
    `status` (pending, accepted, deferred, rejected, suppressed, dead_letter), `reply` (the last
    reply that concerned it) and `attempt_no`."""
    stored = row.get("recipient_outcomes")
    if stored:
        return [
            {"email": o.get("email"), "status": o.get("status"), "reply": o.get("reply"),
             "attempt_no": o.get("attempt_no")}
            for o in stored
        ]
    status = _RECIPIENT_STATUS_OF.get(row["status"], RecipientStatus.PENDING)
    if status == RecipientStatus.PENDING and row["status"] in _NOT_FINAL and row["attempt_count"]:
        status = RecipientStatus.DEFERRED
    tried = status != RecipientStatus.PENDING
    reply = row["status_reason"] if tried and status != RecipientStatus.ACCEPTED else None
    recipients = row["recipients"] or {}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for part in ("to", "cc", "bcc"):
        for value in recipients.get(part) or ():
            email = value.get("email") if isinstance(value, dict) else value
            if not isinstance(email, str) or email.lower() in seen:
                continue
            seen.add(email.lower())
            out.append({"email": email, "status": status.value, "reply": reply,
                        "attempt_no": row["attempt_count"] if tried and row["attempt_count"] else None})
    return out


def delivery_json(row: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "delivery_id": row["delivery_id"],
        "source": row["source"],
        "status": row["status"],
        "status_reason": row["status_reason"],
        "payload_mode": row["payload_mode"],
        "template_id": row["template_id"],
        "locale": row["locale"],
        "resolved_locale": row["resolved_locale"],
        "recipients": _recipients_json(row["recipients"]),
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
        "recipient_outcomes": recipient_outcomes_json(row),
    }


async def get_delivery(db: Database, delivery_id: str) -> dict[str, Any] | None:
    return await db.run(lambda conn: _get_delivery(conn, delivery_id))


async def _get_delivery(conn: Conn, delivery_id: str) -> dict[str, Any] | None:
    cur = await conn.execute(q("delivery_get"), {"delivery_id": delivery_id})
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(q("attempts_for_delivery"), {"delivery_id": delivery_id})
    return delivery_json(row, await cur.fetchall())


def _listing(name: str, conditions: list[str]) -> str:
    """The named listing query with its filter conditions ANDed into its WHERE clause."""
    return q(name).replace("{filters}", " AND ".join(conditions) if conditions else "true")


async def _page(conn: Conn, sql: str, params: dict[str, Any], limit: int) -> tuple[list[dict[str, Any]], bool]:
    """At most `limit` rows, and whether more follow (one row more is read to know)."""
    cur = await conn.execute(sql, {**params, "limit": limit + 1})
    rows = await cur.fetchall()
    return rows[:limit], len(rows) > limit


@dataclass(frozen=True)
class DeliveryFilter:
    status: str | None = None
    source: str | None = None
    recipient: str | None = None


async def list_deliveries(
    db: Database, flt: DeliveryFilter, *, after: DeliveryKey | None, limit: int
) -> tuple[list[dict[str, Any]], DeliveryKey | None]:
    """One page, newest first; the key of its last item when more follow."""
    conditions: list[str] = []
    params: dict[str, Any] = {}
    for name in ("status", "source", "recipient"):
        value = getattr(flt, name)
        if value is not None:
            conditions.append(q(f"deliveries_filter_{name}"))
            params[name] = value
    if after is not None:
        conditions.append(q("deliveries_filter_after"))
        params["after_created_at"], params["after_delivery_id"] = after
    sql = _listing("deliveries_list", conditions)

    async def _list(conn: Conn) -> tuple[list[dict[str, Any]], DeliveryKey | None]:
        rows, more = await _page(conn, sql, params, limit)
        by_id: dict[str, list[dict[str, Any]]] = {row["delivery_id"]: [] for row in rows}
        if rows:
            cur = await conn.execute(q("attempts_for_deliveries"), {"delivery_ids": list(by_id)})
            for attempt in await cur.fetchall():
                by_id[attempt["delivery_id"]].append(attempt)
        items = [delivery_json(row, by_id[row["delivery_id"]]) for row in rows]
        last = (rows[-1]["created_at"], rows[-1]["delivery_id"]) if more else None
        return items, last

    return await db.run(_list)


def _headers_json(value: Any) -> dict[str, str]:
    """The stored extra headers (an object, name -> value; none stored: empty)."""
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Content:
    """The stored rendered content of a delivery; `rendered` is False while there is none."""

    status: str
    rendered: bool
    body: dict[str, Any]


async def get_content(db: Database, delivery_id: str) -> Content | None:
    async def _get(conn: Conn) -> Content | None:
        cur = await conn.execute(q("delivery_content"), {"delivery_id": delivery_id})
        row = await cur.fetchone()
        if row is None:
            return None
        body = {
            "delivery_id": row["delivery_id"],
            "message_id": row["message_id"],
            "subject": row["subject"],
            "text": row["text_body"],
            "html": row["html_body"],
            "headers": _headers_json(row["headers"]),
            "rendered_at": rfc3339(row["rendered_at"]),
        }
        return Content(status=row["status"], rendered=row["rendered_at"] is not None, body=body)

    return await db.run(_get)


@dataclass(frozen=True)
class VerbResult:
    """What an operator verb did: `done` with the delivery after it, else why not."""

    outcome: Literal["done", "not_found", "conflict"]
    delivery: dict[str, Any] | None = None
    status: str | None = None


async def _refused(conn: Conn, delivery_id: str) -> VerbResult:
    cur = await conn.execute(q("delivery_status"), {"delivery_id": delivery_id})
    row = await cur.fetchone()
    if row is None:
        return VerbResult("not_found")
    return VerbResult("conflict", status=row["status"])


async def retry_delivery(db: Database, delivery_id: str) -> VerbResult:
    """`failed` or `dead_letter` back on the schedule with a fresh ladder; wakes the schedulers."""

    async def _retry(conn: Conn) -> VerbResult:
        cur = await conn.execute(q("delivery_retry"), {"delivery_id": delivery_id})
        if await cur.fetchone() is None:
            return await _refused(conn, delivery_id)
        await conn.execute(q("schedule_notify"))
        return VerbResult("done", delivery=await _get_delivery(conn, delivery_id))

    return await db.transaction(_retry)


async def cancel_delivery(db: Database, delivery_id: str) -> VerbResult:
    """`queued` or `rendered` to `cancelled`."""

    async def _cancel(conn: Conn) -> VerbResult:
        cur = await conn.execute(q("delivery_cancel"), {"delivery_id": delivery_id})
        if await cur.fetchone() is None:
            return await _refused(conn, delivery_id)
        return VerbResult("done", delivery=await _get_delivery(conn, delivery_id))

    return await db.transaction(_cancel)


def dead_letter_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "delivery_id": row["delivery_id"],
        "reason": row["reason"],
        "created_at": rfc3339(row["created_at"]),
        "source": row["source"],
        "status": row["status"],
        "template_id": row["template_id"],
        "recipients": _recipients_json(row["recipients"]),
        "attempt_count": row["attempt_count"],
        "message_id": row["message_id"],
        "last_attempt": (
            {
                "attempt_no": row["last_attempt_no"],
                "status": row["last_attempt_status"],
                "provider_summary": row["last_provider_summary"],
                "finished_at": rfc3339(row["last_attempt_finished_at"]),
            }
            if row["last_attempt_no"] is not None
            else None
        ),
    }


async def list_dead_letters(
    db: Database, *, after: DeliveryKey | None, limit: int
) -> tuple[list[dict[str, Any]], DeliveryKey | None]:
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if after is not None:
        conditions.append(q("dead_letters_filter_after"))
        params["after_created_at"], params["after_delivery_id"] = after
    sql = _listing("dead_letters_list", conditions)

    async def _list(conn: Conn) -> tuple[list[dict[str, Any]], DeliveryKey | None]:
        rows, more = await _page(conn, sql, params, limit)
        last = (rows[-1]["created_at"], rows[-1]["delivery_id"]) if more else None
        return [dead_letter_json(row) for row in rows], last

    return await db.run(_list)


def malformed_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "failure_code": row["failure_code"],
        "failure_detail": row["failure_detail"],
        "stream_entry_id": row["stream_entry_id"],
        "delivery_id": row["delivery_id"],
        "source": row["source"],
        "fields": row["fields"],
        "received_at": rfc3339(row["received_at"]),
    }


async def list_malformed(
    db: Database, *, failure_code: str | None, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if failure_code is not None:
        conditions.append(q("malformed_filter_code"))
        params["failure_code"] = failure_code
    if after is not None:
        conditions.append(q("malformed_filter_after"))
        params["after_id"] = after
    sql = _listing("malformed_list", conditions)

    async def _list(conn: Conn) -> tuple[list[dict[str, Any]], int | None]:
        rows, more = await _page(conn, sql, params, limit)
        return [malformed_json(row) for row in rows], (rows[-1]["id"] if more else None)

    return await db.run(_list)


async def schedule_summary(db: Database) -> dict[str, Any]:
    """`{"depth", "oldest_age_ms", "by_status"}` from one statement (one snapshot)."""

    async def _summary(conn: Conn) -> dict[str, Any]:
        cur = await conn.execute(q("schedule_summary"))
        row = await cur.fetchone()
        assert row is not None
        counts = row["by_status"] or {}
        by_status = {status: int(counts.get(status, 0)) for status in DELIVERY_STATUSES}
        return {
            "depth": sum(by_status[status] for status in WAITING_STATUSES),
            "oldest_age_ms": int(row["oldest_age_ms"]),
            "by_status": by_status,
        }

    return await db.run(_summary)


async def schedule_gauges(db: Database) -> tuple[int, int]:
    """(depth, oldest_age_ms) of the waiting slice, for the schedule gauges."""

    async def _gauges(conn: Conn) -> tuple[int, int]:
        cur = await conn.execute(q("schedule_gauges"))
        row = await cur.fetchone()
        assert row is not None
        return int(row["depth"]), int(row["oldest_age_ms"])

    return await db.run(_gauges)


FINAL_STATUSES = TERMINAL_STATUSES


async def activity(db: Database, *, minutes: int) -> dict[str, Any]:
    """What the console's overview shows beside the schedule, in one connection checkout:
    `dead_letters_last_hour`, `malformed_last_hour`, `outcomes` (one entry per minute of the last
    `minutes`, oldest first: `{"minute", "counts": {final status: n}}`) and `lease_holders`
    (`instance_id`, `deliveries`, `oldest_lease_started_at`, `latest_lease_expires_at`)."""

    async def _activity(conn: Conn) -> dict[str, Any]:
        cur = await conn.execute(q("recent_failures"))
        recent = await cur.fetchone()
        assert recent is not None
        cur = await conn.execute(q("outcome_rates"), {"minutes": minutes})
        counted: dict[datetime, dict[str, int]] = {}
        for row in await cur.fetchall():
            counted.setdefault(row["minute"], {})[row["status"]] = int(row["n"])
        current: datetime = recent["current_minute"]
        outcomes = []
        for back in range(minutes - 1, -1, -1):
            minute = current - timedelta(minutes=back)
            counts = counted.get(minute, {})
            outcomes.append({"minute": rfc3339(minute),
                             "counts": {status: counts.get(status, 0) for status in FINAL_STATUSES}})
        cur = await conn.execute(q("lease_holders"))
        holders = [
            {
                "instance_id": row["instance_id"],
                "deliveries": int(row["deliveries"]),
                "oldest_lease_started_at": rfc3339(row["oldest_lease_started_at"]),
                "latest_lease_expires_at": rfc3339(row["latest_lease_expires_at"]),
            }
            for row in await cur.fetchall()
        ]
        return {
            "dead_letters_last_hour": int(recent["dead_letters"]),
            "malformed_last_hour": int(recent["malformed_commands"]),
            "outcomes": outcomes,
            "lease_holders": holders,
        }

    return await db.run(_activity)
