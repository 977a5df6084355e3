"""Helpers for the engine tests: deliveries inserted the way intake stores them, and reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailtrio.message import message_id_for, sender_domain

SMTP_FROM = "Mail Service <no-reply@mailtrio.test>"
TERMINAL = ("sent", "suppressed", "failed", "dead_letter", "cancelled")


def _recipient(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"email": value, "name": None}
    return {"email": value["email"], "name": value.get("name")}


def delivery(
    delivery_id: str,
    *,
    source: str = "notification",
    mode: str = "template",
    template_id: str | None = "login-code",
    locale: str = "en",
    to: Sequence[Any] = ("someone@example.com",),
    cc: Sequence[Any] = (),
    bcc: Sequence[Any] = (),
    variables: dict[str, Any] | None = None,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    headers: dict[str, str] | None = None,
    reply_to: Any = None,
    send_at: datetime | None = None,
    delay_s: float = 0.0,
    traceparent: str | None = None,
    smtp_from: str = SMTP_FROM,
) -> dict[str, Any]:
    """A delivery row and its payload as intake stores them (queued, due at send_at or now)."""
    payload: dict[str, Any] = {"to": list(to)}
    if cc:
        payload["cc"] = list(cc)
    if bcc:
        payload["bcc"] = list(bcc)
    if reply_to is not None:
        payload["reply_to"] = reply_to
    if headers:
        payload["headers"] = headers
    if mode == "template":
        payload["template_id"] = template_id
        payload["variables"] = variables if variables is not None else {"code": "123456"}
    else:
        template_id = None
        payload["subject"] = subject if subject is not None else "Hello"
        if text is not None:
            payload["text"] = text
        if html is not None:
            payload["html"] = html
        if text is None and html is None:
            payload["text"] = "Hello there."
    recipients = {"to": [_recipient(r) for r in to], "cc": [_recipient(r) for r in cc],
                  "bcc": [_recipient(r) for r in bcc]}
    emails = [r["email"].lower() for part in recipients.values() for r in part]
    return {
        "delivery_id": delivery_id,
        "source": source,
        "idempotency_key": f"key-{delivery_id}",
        "payload_mode": mode,
        "template_id": template_id,
        "locale": locale,
        "recipients": json.dumps(recipients),
        "recipient_emails": emails,
        "send_at": send_at,
        "delay_s": delay_s,
        "message_id": message_id_for(source, delivery_id, sender_domain(smtp_from)),
        "traceparent": traceparent,
        "payload": json.dumps(payload),
    }


INSERT_DELIVERIES = """
INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, status, payload_mode, template_id,
    locale, recipients, recipient_emails, send_at, next_attempt_at, schedule_entered_at, message_id,
    traceparent)
SELECT t.delivery_id, t.source, t.idempotency_key, 'queued', t.payload_mode, t.template_id, t.locale,
       t.recipients::jsonb, t.recipient_emails::text[],
       t.send_at, coalesce(t.send_at, now() + make_interval(secs => t.delay_s)),
       greatest(now(), coalesce(t.send_at, now())), t.message_id, t.traceparent
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(delivery_id text, source text, idempotency_key text,
    payload_mode text, template_id text, locale text, recipients text, recipient_emails text,
    send_at timestamptz, delay_s float8, message_id text, traceparent text)
"""

INSERT_PAYLOADS = """
INSERT INTO mail.payloads (delivery_id, payload)
SELECT t.delivery_id, t.payload::jsonb
FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(delivery_id text, payload text)
"""


def insert(dsn: str, rows: Iterable[dict[str, Any]], *, notify: bool = True) -> list[str]:
    """Insert deliveries in one transaction (as intake commits a batch), then NOTIFY."""
    items = list(rows)
    for item in items:
        item["recipient_emails"] = "{" + ",".join(json.dumps(e) for e in item["recipient_emails"]) + "}"
        if isinstance(item.get("send_at"), datetime):
            item["send_at"] = item["send_at"].isoformat()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for start in range(0, len(items), 5000):
            chunk = json.dumps(items[start:start + 5000])
            conn.execute(INSERT_DELIVERIES, {"rows": chunk})
            conn.execute(INSERT_PAYLOADS, {"rows": chunk})
        if notify:
            conn.execute("SELECT pg_notify('mail_schedule', '')")
    return [i["delivery_id"] for i in items]


def query(dsn: str, sql: str, params: dict[str, Any] | Sequence[Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return list(conn.execute(sql, params).fetchall())


def deliveries(dsn: str, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    if ids is None:
        rows = query(dsn, "SELECT * FROM mail.deliveries")
    else:
        rows = query(dsn, "SELECT * FROM mail.deliveries WHERE delivery_id = ANY(%s)", [list(ids)])
    return {r["delivery_id"]: r for r in rows}


def attempts(dsn: str, delivery_id: str | None = None) -> list[dict[str, Any]]:
    if delivery_id is None:
        return query(dsn, "SELECT * FROM mail.attempts ORDER BY delivery_id, attempt_no")
    return query(dsn, "SELECT * FROM mail.attempts WHERE delivery_id = %s ORDER BY attempt_no", [delivery_id])


def wait_status(
    dsn: str,
    ids: Sequence[str],
    statuses: Sequence[str] = TERMINAL,
    timeout: float = 30.0,
) -> dict[str, dict[str, Any]]:
    """Poll until every delivery in `ids` has one of `statuses`; return them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = query(
            dsn,
            "SELECT delivery_id, status FROM mail.deliveries WHERE delivery_id = ANY(%s)",
            [list(ids)],
        )
        pending = [r["delivery_id"] for r in rows if r["status"] not in statuses]
        if len(rows) == len(set(ids)) and not pending:
            return deliveries(dsn, ids)
        if time.monotonic() > deadline:
            sample = {r["delivery_id"]: r["status"] for r in rows if r["status"] not in statuses}
            raise AssertionError(
                f"{len(pending)} of {len(ids)} deliveries not in {statuses} after {timeout}s: "
                f"{dict(list(sample.items())[:10])}"
            )
        time.sleep(0.05)


def status_counts(dsn: str) -> dict[str, int]:
    rows = query(dsn, "SELECT status, count(*) AS n FROM mail.deliveries GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def entry(
    delivery_id: str,
    *,
    source: str = "notification",
    template_id: str = "login-code",
    locale: str = "en",
    to: Sequence[Any] = ("someone@example.com",),
    variables: dict[str, Any] | None = None,
    send_at: datetime | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> dict[str, str]:
    """A well-formed command stream entry (CONTRACT §4) in template mode."""
    payload = {"template_id": template_id, "to": list(to),
               "variables": variables if variables is not None else {"code": "123456"}}
    fields = {
        "delivery_id": delivery_id,
        "source": source,
        "idempotency_key": idempotency_key or f"key-{delivery_id}",
        "payload_mode": "template",
        "locale": locale,
        "payload": json.dumps(payload),
    }
    if send_at is not None:
        fields["send_at"] = send_at.isoformat()
    if traceparent is not None:
        fields["traceparent"] = traceparent
    return fields


def xadd(redis_client: Any, stream_key: str, entries: Iterable[dict[str, str]]) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream_key, fields)
    pipe.execute()
