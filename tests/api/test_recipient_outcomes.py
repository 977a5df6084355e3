"""`recipient_outcomes` in the delivery JSON: stored outcomes as they are, and for a delivery with
none stored (one recipient, or not tried yet) one outcome per envelope address derived from the
delivery's status."""

from __future__ import annotations

from typing import Any

import pytest

from mailtrio.store.api import recipient_outcomes_json

RECIPIENTS = {"to": [{"email": "A@example.com", "name": "A"}], "cc": [{"email": "b@example.com", "name": None}],
              "bcc": [{"email": "a@example.com", "name": None}, {"email": "c@example.com", "name": None}]}


def row(status: str, *, attempts: int = 0, reason: str | None = None, stored: Any = None) -> dict[str, Any]:
    return {"status": status, "attempt_count": attempts, "status_reason": reason, "recipients": RECIPIENTS,
            "recipient_outcomes": stored}


@pytest.mark.parametrize(("status", "attempts", "reason", "expected", "reply", "attempt_no"), [
    ("queued", 0, None, "pending", None, None),
    ("rendered", 0, None, "pending", None, None),
    ("rendered", 2, "451 4.3.0 later", "deferred", "451 4.3.0 later", 2),
    ("sending", 1, "451 4.3.0 later", "deferred", "451 4.3.0 later", 1),
    ("sent", 1, None, "accepted", None, 1),
    ("failed", 1, "550 5.1.1 unknown", "rejected", "550 5.1.1 unknown", 1),
    ("failed", 0, "render_failed: boom", "rejected", "render_failed: boom", None),
    ("suppressed", 1, "550 suppressed", "suppressed", "550 suppressed", 1),
    ("dead_letter", 6, "451 later", "dead_letter", "451 later", 6),
    ("cancelled", 0, "cancelled by operator", "pending", None, None),
])
def test_derived_outcomes_follow_the_delivery(status: str, attempts: int, reason: str | None, expected: str,
                                              reply: str | None, attempt_no: int | None) -> None:
    out = recipient_outcomes_json(row(status, attempts=attempts, reason=reason))
    # to, cc, bcc order, each address once (case-insensitively), as the envelope has them
    assert [o["email"] for o in out] == ["A@example.com", "b@example.com", "c@example.com"]
    assert {(o["status"], o["reply"], o["attempt_no"]) for o in out} == {(expected, reply, attempt_no)}


def test_stored_outcomes_are_shown_as_stored() -> None:
    stored = [{"email": "A@example.com", "status": "accepted", "reply": "250 ok", "attempt_no": 1},
              {"email": "b@example.com", "status": "deferred", "reply": "450 busy", "attempt_no": 2}]
    assert recipient_outcomes_json(row("rendered", attempts=2, stored=stored)) == stored
