"""Fixtures of the operator-surface tests: a running `mailtrio serve`, a direct SQL connection and
row factories that satisfy the schema's CHECK constraints.

Waiting rows (`queued`/`rendered`) are due a day from now unless told otherwise, so a running
scheduler leaves them alone while a test looks at them.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.support.serve import ServeProcess

API = "/api/v1/internal"
WAITING = ("queued", "rendered")
TERMINAL = ("sent", "suppressed", "failed", "dead_letter", "cancelled")
_seq = itertools.count(1)


def new_id(prefix: str = "d") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sql(database: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(database, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def served(service_env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        yield proc
        proc.stop()


def delivery_row(
    *,
    delivery_id: str | None = None,
    status: str = "queued",
    source: str = "notification",
    payload_mode: str = "template",
    to: list[str] | None = None,
    cc: list[str] | None = None,
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
    next_attempt_at: datetime | None = None,
    schedule_entered_at: datetime | None = None,
    status_reason: str | None = None,
    attempt_count: int = 0,
    ladder_step: int = 0,
    send_at: datetime | None = None,
) -> dict[str, Any]:
    """A `mail.deliveries` row valid under every CHECK constraint."""
    now = datetime.now(UTC)
    did = delivery_id or new_id()
    to = to if to is not None else [f"user{next(_seq)}@example.com"]
    cc = cc or []
    waiting = status in WAITING
    sending = status == "sending"
    return {
        "delivery_id": did,
        "source": source,
        "idempotency_key": f"key-{did}",
        "status": status,
        "status_reason": status_reason,
        "payload_mode": payload_mode,
        "template_id": "newsletter" if payload_mode == "template" else None,
        "locale": "en",
        "resolved_locale": "en" if status not in ("queued",) else None,
        "recipients": json.dumps({"to": [{"email": a, "name": None} for a in to],
                                  "cc": [{"email": a, "name": None} for a in cc], "bcc": []}),
        "recipient_emails": [a.lower() for a in to + cc],
        "send_at": send_at,
        "next_attempt_at": (next_attempt_at or now + timedelta(days=1)) if waiting else None,
        "schedule_entered_at": (schedule_entered_at or now) if waiting else schedule_entered_at,
        "attempt_count": attempt_count,
        "ladder_step": ladder_step,
        "message_id": f"<{did}.test@example.com>",
        "lease_owner": "test-owner" if sending else None,
        "lease_expires_at": now + timedelta(minutes=1) if sending else None,
        "lease_started_at": now if sending else None,
        "created_at": created_at or now,
        # recent unless told otherwise: the service's retention worker leaves the row alone
        "updated_at": updated_at or now,
    }


_COLUMNS = list(delivery_row().keys())
_INSERT = (
    f"INSERT INTO mail.deliveries ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in _COLUMNS)})"
)


def insert_deliveries(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[str]:
    with conn.cursor() as cur:
        cur.executemany(_INSERT, rows)
    return [r["delivery_id"] for r in rows]


def insert_delivery(conn: psycopg.Connection[Any], **kwargs: Any) -> str:
    return insert_deliveries(conn, [delivery_row(**kwargs)])[0]


def insert_attempt(conn: psycopg.Connection[Any], delivery_id: str, attempt_no: int, status: str,
                   summary: str | None = None, *, finished_at: datetime | None = None) -> None:
    finished = finished_at or datetime.now(UTC)
    conn.execute(
        "INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at, duration_ms, "
        "provider_summary, instance_id) VALUES (%s, %s, %s, %s, %s, %s, %s, 'test-instance')",
        (delivery_id, attempt_no, status, finished - timedelta(milliseconds=120), finished, 120, summary),
    )


def insert_dead_letter(conn: psycopg.Connection[Any], delivery_id: str, reason: str,
                       created_at: datetime | None = None) -> None:
    conn.execute(
        "INSERT INTO mail.dead_letters (delivery_id, reason, created_at) VALUES (%s, %s, coalesce(%s, now()))",
        (delivery_id, reason, created_at),
    )


def insert_payload(conn: psycopg.Connection[Any], delivery_id: str, *, rendered: bool,
                   subject: str = "Hello", text: str | None = "Hi there", html: str | None = None,
                   headers: dict[str, str] | None = None) -> None:
    payload = {"template_id": "newsletter", "to": ["someone@example.com"],
               "variables": {"title": "Spring news", "intro": "Hello Ada"}}
    if rendered:
        conn.execute(
            "INSERT INTO mail.payloads (delivery_id, payload, subject, text_body, html_body, headers, rendered_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, now())",
            (delivery_id, json.dumps(payload), subject, text, html, json.dumps(headers or {})),
        )
    else:
        conn.execute("INSERT INTO mail.payloads (delivery_id, payload) VALUES (%s, %s)",
                     (delivery_id, json.dumps(payload)))


def insert_malformed(conn: psycopg.Connection[Any], failure_code: str, *, delivery_id: str | None = None,
                     source: str | None = "notification", received_at: datetime | None = None) -> int:
    row = conn.execute(
        "INSERT INTO mail.malformed_commands (failure_code, failure_detail, stream_entry_id, delivery_id, source, "
        "fields, received_at) VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s, now())) RETURNING id",
        (failure_code, f"detail of {failure_code}", f"{next(_seq)}-{uuid.uuid4().int % 1000}",
         delivery_id, source, json.dumps({"delivery_id": delivery_id or "", "payload": "{"}), received_at),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def insert_reservation(conn: psycopg.Connection[Any], *, expires_at: datetime,
                       source: str = "notification") -> str:
    key = new_id("idem")
    conn.execute(
        "INSERT INTO mail.idempotency_reservations (source, idempotency_key, delivery_id, fingerprint, expires_at) "
        "VALUES (%s, %s, %s, 'fp', %s)",
        (source, key, new_id(), expires_at),
    )
    return key


def status_of(conn: psycopg.Connection[Any], delivery_id: str) -> str | None:
    row = conn.execute("SELECT status FROM mail.deliveries WHERE delivery_id = %s", (delivery_id,)).fetchone()
    return None if row is None else str(row["status"])


def settings_for(dsn: str, **env: str) -> Any:
    """Settings of an in-process service on `dsn` (stub mode, the sample catalog)."""
    from mailtrio.config import Settings
    from tests.support.serve import TEMPLATES

    return Settings.from_env({
        "MAIL_REDIS_MASTER_ADDR": "127.0.0.1:6379",
        "MAIL_POSTGRES_PRIMARY_DSN": dsn,
        "MAIL_TEMPLATE_DIR": str(TEMPLATES),
        "MAIL_SMTP_MODE": "stub",
        "MAIL_INSTANCE_ID": "api-test",
        **env,
    })
