"""The database's own delivery_id rule (sql/00010_delivery_id_check.sql) is the contract's and
the validator's: 1-128 characters of [A-Za-z0-9._:-]."""

from __future__ import annotations

import psycopg
import pytest

from mailtrio import commands

CASES = ["a", "A-z.0_9:x", "x" * 128, "x" * 129, "", "a b", "ä", "a\n", "\na", "a/b", "a%"]


def _insert(conn: psycopg.Connection, delivery_id: str) -> None:
    conn.execute(
        "INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, status, payload_mode, template_id,"
        " locale, recipients, recipient_emails, next_attempt_at, message_id)"
        " VALUES (%s, 'notification', %s, 'queued', 'template', 't', 'en', '{}', '{}', now(), 'm')",
        (delivery_id, f"k-{delivery_id}"),
    )


@pytest.mark.parametrize("delivery_id", CASES)
def test_the_database_accepts_exactly_the_delivery_ids_validation_accepts(database: str, delivery_id: str) -> None:
    valid = commands._DELIVERY_ID_RE.fullmatch(delivery_id) is not None
    with psycopg.connect(database, autocommit=True) as conn:
        if valid:
            _insert(conn, delivery_id)
        else:
            with pytest.raises(psycopg.errors.CheckViolation):
                _insert(conn, delivery_id)
