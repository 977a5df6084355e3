"""Each route of CONTRACT §7 through the real `mailtrio serve`: success and error paths."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg

from tests.api.conftest import (
    API,
    delivery_row,
    insert_attempt,
    insert_dead_letter,
    insert_deliveries,
    insert_delivery,
    insert_malformed,
    insert_payload,
    new_id,
    status_of,
)
from tests.api.schema import assert_conforms
from tests.support.serve import ServeProcess

Conn = psycopg.Connection[dict[str, Any]]
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def get(proc: ServeProcess, path: str, **query: Any) -> tuple[int, Any]:
    qs = f"?{urlencode(query)}" if query else ""
    return proc.http("GET", f"{API}{path}{qs}")


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert_conforms("Error", body)
    assert body["error"]["code"] == code


# -- GET /deliveries/{id} -------------------------------------------------------------------------
def test_get_delivery_with_attempts_and_dead_letter(served: ServeProcess, sql: Conn) -> None:
    created = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    did = insert_delivery(sql, status="dead_letter", status_reason="421 try later", to=["Ada@Example.com"],
                          cc=["cc@example.com"], attempt_count=2, ladder_step=2, created_at=created)
    insert_attempt(sql, did, 2, "timed_out", "timed out after 30s")
    insert_attempt(sql, did, 1, "provider_deferred", "421 try later")
    insert_dead_letter(sql, did, "421 try later")

    status, body = get(served, f"/deliveries/{did}")
    assert status == 200, body
    assert_conforms("Delivery", body)
    assert body["delivery_id"] == did
    assert body["status"] == "dead_letter"
    assert body["status_reason"] == "421 try later"
    assert body["source"] == "notification"
    assert body["payload_mode"] == "template"
    assert body["template_id"] == "newsletter"
    assert body["recipients"]["to"] == [{"email": "Ada@Example.com", "name": None}]
    assert body["recipients"]["cc"] == [{"email": "cc@example.com", "name": None}]
    assert body["recipients"]["bcc"] == []
    assert body["created_at"] == "2026-03-01T12:00:00.123Z"
    assert body["next_attempt_at"] is None
    assert body["attempt_count"] == 2
    assert [a["attempt_no"] for a in body["attempts"]] == [1, 2]
    assert body["attempts"][1]["status"] == "timed_out"
    assert body["attempts"][0]["provider_summary"] == "421 try later"
    assert body["attempts"][0]["duration_ms"] == 120
    assert body["dead_letter"]["reason"] == "421 try later"
    for value in (body["updated_at"], body["attempts"][0]["started_at"], body["dead_letter"]["created_at"]):
        assert RFC3339_MS.match(value), value

    # a delivery without attempts or dead letter
    other = insert_delivery(sql, status="queued")
    status, body = get(served, f"/deliveries/{other}")
    assert status == 200
    assert body["attempts"] == [] and body["dead_letter"] is None
    assert RFC3339_MS.match(body["next_attempt_at"])


def test_get_delivery_errors(served: ServeProcess) -> None:
    assert_error(*get(served, "/deliveries/does-not-exist"), 404, "not_found")
    # outside the contract's delivery_id alphabet or length: invalid_argument, never a 500
    for bad in ("bad%20id", "bad%00id", "x" * 129, "%C3%A9t%C3%A9", "a%0Ab"):
        assert_error(*get(served, f"/deliveries/{bad}"), 400, "invalid_argument")
    assert_error(*served.http("GET", f"{API}/no-such-route"), 404, "not_found")
    assert_error(*served.http("GET", "/elsewhere"), 404, "not_found")
    status, body = served.http("DELETE", f"{API}/deliveries/x")
    assert status == 405 and "error" in body


# -- GET /deliveries ------------------------------------------------------------------------------
def test_list_deliveries_filters(served: ServeProcess, sql: Conn) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    rows = [
        delivery_row(status="queued", source="authsession", to=["Mixed.Case@Example.COM"],
                     created_at=base + timedelta(seconds=1)),
        delivery_row(status="sent", source="notification", to=["a@example.com"], cc=["mixed.case@example.com"],
                     created_at=base + timedelta(seconds=2)),
        delivery_row(status="sent", source="authsession", to=["b@example.com"], created_at=base + timedelta(seconds=3)),
        delivery_row(status="failed", source="notification", to=["c@example.com"],
                     created_at=base + timedelta(seconds=4)),
        delivery_row(status="cancelled", source="notification", to=["d@example.com"],
                     created_at=base + timedelta(seconds=5)),
    ]
    ids = insert_deliveries(sql, rows)
    insert_attempt(sql, ids[1], 1, "provider_accepted", "250 ok")

    status, body = get(served, "/deliveries")
    assert status == 200
    assert_conforms("DeliveryPage", body)
    assert [d["delivery_id"] for d in body["items"]] == ids[::-1]
    assert body["next_cursor"] is None
    assert body["items"][3]["attempts"][0]["provider_summary"] == "250 ok"

    def listed(**query: Any) -> list[str]:
        status, body = get(served, "/deliveries", **query)
        assert status == 200, body
        assert_conforms("DeliveryPage", body)
        return [d["delivery_id"] for d in body["items"]]

    assert listed(status="sent") == [ids[2], ids[1]]
    assert listed(source="authsession") == [ids[2], ids[0]]
    assert listed(status="sent", source="authsession") == [ids[2]]
    assert listed(status="rendered") == []
    # recipient: to or cc, case-insensitive
    assert listed(recipient="mixed.case@example.com") == [ids[1], ids[0]]
    assert listed(recipient="MIXED.CASE@EXAMPLE.COM", source="authsession") == [ids[0]]
    assert listed(recipient="nobody@example.com") == []
    assert listed(limit=2) == [ids[4], ids[3]]

    status, body = get(served, "/deliveries", limit=2)
    cursor = body["next_cursor"]
    assert isinstance(cursor, str) and re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    assert listed(limit=2, cursor=cursor) == [ids[2], ids[1]]


BAD_LIST_QUERIES = [
    "limit=0", "limit=501", "limit=abc", "limit=-1", "limit=1.5", "limit=", "limit=10&limit=20",
    "status=bogus", "status=", "source=email", "recipient=", "recipient=a%00b", "recipient=a%0Ab",
    "recipient=" + "x" * 321,
    # not base64url, not JSON, JSON of the wrong shape, empty, too long
    "cursor=%%%", "cursor=bm90LWpzb24", "cursor=e30", "cursor=", "cursor=" + "A" * 2000,
    # right shape, wrong types or values: a bool for t, an id outside the alphabet, a year past 9999
    "cursor=" + "eyJrIjoiZCIsInQiOnRydWUsImlkIjoiYSJ9", "cursor=" + "eyJrIjoiZCIsInQiOjEsImlkIjoiYVx1MDAwMGIifQ",
    "cursor=" + "eyJrIjoiZCIsInQiOjk5OTk5OTk5OTk5OTk5OTk5OTk5LCJpZCI6ImEifQ",
]


def test_list_deliveries_rejects_bad_parameters(served: ServeProcess) -> None:
    for query in BAD_LIST_QUERIES:
        status, body = served.http("GET", f"{API}/deliveries?{query}")
        assert status == 400, (query, body)
        assert_error(status, body, 400, "invalid_argument")


def test_cursor_of_one_listing_is_refused_by_another(served: ServeProcess, sql: Conn) -> None:
    ids = [insert_malformed(sql, "invalid_json") for _ in range(3)]
    status, body = get(served, "/malformed-commands", limit=1)
    assert status == 200 and body["items"][0]["id"] == ids[-1]
    assert_error(*get(served, "/deliveries", cursor=body["next_cursor"]), 400, "invalid_argument")
    assert_error(*get(served, "/dead-letters", cursor=body["next_cursor"]), 400, "invalid_argument")


# -- GET /deliveries/{id}/content -----------------------------------------------------------------
def test_content(served: ServeProcess, sql: Conn) -> None:
    rendered = insert_delivery(sql, status="rendered")
    insert_payload(sql, rendered, rendered=True, subject="Your code", text="123456", html="<p>123456</p>",
                   headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"})
    status, body = get(served, f"/deliveries/{rendered}/content")
    assert status == 200, body
    assert_conforms("Content", body)
    assert body["subject"] == "Your code"
    assert body["text"] == "123456"
    assert body["html"] == "<p>123456</p>"
    assert body["headers"] == {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"}
    assert body["message_id"] == f"<{rendered}.test@example.com>"
    assert RFC3339_MS.match(body["rendered_at"])

    # not rendered yet (payload stored, no content) and render failed (no content): 409 conflict
    queued = insert_delivery(sql, status="queued")
    insert_payload(sql, queued, rendered=False)
    status, body = get(served, f"/deliveries/{queued}/content")
    assert_error(status, body, 409, "conflict")
    assert "queued" in body["error"]["message"]
    failed = insert_delivery(sql, status="failed", status_reason="render_failed: undefined variable 'name'")
    assert_error(*get(served, f"/deliveries/{failed}/content"), 409, "conflict")

    assert_error(*get(served, "/deliveries/unknown-id/content"), 404, "not_found")
    assert_error(*get(served, "/deliveries/bad%00id/content"), 400, "invalid_argument")


# -- POST /deliveries/{id}/retry ------------------------------------------------------------------
def test_retry_puts_dead_letter_and_failed_back_on_the_schedule(served: ServeProcess, sql: Conn) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=2)
    dead = insert_delivery(sql, status="dead_letter", status_reason="421 busy", attempt_count=6, ladder_step=5,
                           created_at=long_ago, schedule_entered_at=long_ago)
    insert_payload(sql, dead, rendered=True)
    insert_attempt(sql, dead, 1, "provider_deferred", "421 busy")
    insert_dead_letter(sql, dead, "421 busy")
    failed = insert_delivery(sql, status="failed", status_reason="render_failed: boom", created_at=long_ago)

    with psycopg.connect(served.env["MAIL_POSTGRES_PRIMARY_DSN"], autocommit=True) as listener:
        listener.execute("LISTEN mail_schedule")
        before = datetime.now(UTC)
        status, body = served.http("POST", f"{API}/deliveries/{dead}/retry")
        assert status == 202, body
        assert_conforms("Delivery", body)
        notified = [n.channel for n in listener.notifies(timeout=5, stop_after=1)]
        assert notified == ["mail_schedule"]

    assert body["status"] == "rendered"
    assert body["status_reason"] is None
    assert body["dead_letter"] is None
    assert body["attempt_count"] == 6
    assert len(body["attempts"]) == 1
    # the answer is the delivery as the retry left it (the running engine may claim it right after)
    due = datetime.fromisoformat(body["next_attempt_at"])
    assert before - timedelta(seconds=1) <= due <= datetime.now(UTC) + timedelta(seconds=1)
    assert sql.execute("SELECT count(*) AS n FROM mail.dead_letters").fetchone() == {"n": 0}

    # no stored content: back to queued (rendered again on its next attempt)
    status, body = served.http("POST", f"{API}/deliveries/{failed}/retry")
    assert status == 202, body
    assert body["status"] == "queued" and body["status_reason"] is None

    # anything else is a conflict; the delivery is unchanged
    for other_status in ("queued", "rendered", "sending", "sent", "suppressed", "cancelled"):
        did = insert_delivery(sql, status=other_status)
        status, body = served.http("POST", f"{API}/deliveries/{did}/retry")
        assert_error(status, body, 409, "conflict")
        assert other_status in body["error"]["message"]
        assert status_of(sql, did) == other_status
    # already retried: no longer failed
    assert_error(*served.http("POST", f"{API}/deliveries/{dead}/retry"), 409, "conflict")
    assert_error(*served.http("POST", f"{API}/deliveries/nope/retry"), 404, "not_found")
    assert_error(*served.http("POST", f"{API}/deliveries/bad%20id/retry"), 400, "invalid_argument")
    assert_error(*served.http("GET", f"{API}/deliveries/{dead}/retry"), 405, "not_found")


# -- POST /deliveries/{id}/cancel -----------------------------------------------------------------
def test_cancel_only_waiting_deliveries(served: ServeProcess, sql: Conn) -> None:
    for waiting in ("queued", "rendered"):
        did = insert_delivery(sql, status=waiting)
        status, body = served.http("POST", f"{API}/deliveries/{did}/cancel")
        assert status == 200, body
        assert_conforms("Delivery", body)
        assert body["status"] == "cancelled"
        assert body["status_reason"] == "cancelled by operator"
        assert body["next_attempt_at"] is None
        # cancelling twice is a conflict
        assert_error(*served.http("POST", f"{API}/deliveries/{did}/cancel"), 409, "conflict")

    for other_status in ("sending", "sent", "suppressed", "failed", "dead_letter"):
        did = insert_delivery(sql, status=other_status)
        status, body = served.http("POST", f"{API}/deliveries/{did}/cancel")
        assert_error(status, body, 409, "conflict")
        assert status_of(sql, did) == other_status
    assert_error(*served.http("POST", f"{API}/deliveries/nope/cancel"), 404, "not_found")
    assert_error(*served.http("POST", f"{API}/deliveries/%00/cancel"), 400, "invalid_argument")


# -- GET /dead-letters ----------------------------------------------------------------------------
def test_dead_letters_newest_first_with_pages(served: ServeProcess, sql: Conn) -> None:
    base = datetime.now(UTC) - timedelta(hours=2)
    ids = []
    for i in range(7):
        did = insert_delivery(sql, status="dead_letter", status_reason=f"reason {i}", attempt_count=1)
        insert_attempt(sql, did, 1, "transport_failed", f"connection refused {i}")
        # two entries share each timestamp: delivery_id breaks the tie
        insert_dead_letter(sql, did, f"reason {i}", created_at=base + timedelta(minutes=i // 2))
        ids.append(did)
    insert_delivery(sql, status="failed")  # not a dead letter
    expected = [d for _, d in sorted(((i // 2, d) for i, d in enumerate(ids)), reverse=True)]

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query: dict[str, Any] = {"limit": 3}
        if cursor:
            query["cursor"] = cursor
        status, body = get(served, "/dead-letters", **query)
        assert status == 200, body
        assert_conforms("DeadLetterPage", body)
        seen += [item["delivery_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    status, body = get(served, "/dead-letters", limit=1)
    item = body["items"][0]
    assert item["last_attempt"]["status"] == "transport_failed"
    assert item["last_attempt"]["provider_summary"].startswith("connection refused")
    assert item["reason"].startswith("reason")
    assert_error(*get(served, "/dead-letters", limit=0), 400, "invalid_argument")
    assert_error(*get(served, "/dead-letters", cursor="Zm9v"), 400, "invalid_argument")


# -- GET /malformed-commands ----------------------------------------------------------------------
def test_malformed_commands_by_code_with_pages(served: ServeProcess, sql: Conn) -> None:
    codes = ["invalid_json", "missing_field", "invalid_json", "unsafe_header", "invalid_json"]
    ids = [insert_malformed(sql, code, delivery_id=new_id() if i % 2 else None) for i, code in enumerate(codes)]

    status, body = get(served, "/malformed-commands")
    assert status == 200
    assert_conforms("MalformedCommandPage", body)
    assert [m["id"] for m in body["items"]] == ids[::-1]
    item = body["items"][0]
    assert set(item) == {"id", "failure_code", "failure_detail", "stream_entry_id", "delivery_id", "source",
                         "fields", "received_at"}
    assert item["fields"]["payload"] == "{"

    json_ids = [i for i, code in zip(ids, codes, strict=True) if code == "invalid_json"][::-1]
    status, body = get(served, "/malformed-commands", failure_code="invalid_json", limit=2)
    assert [m["id"] for m in body["items"]] == json_ids[:2]
    status, body = get(served, "/malformed-commands", failure_code="invalid_json", limit=2, cursor=body["next_cursor"])
    assert [m["id"] for m in body["items"]] == json_ids[2:]
    assert body["next_cursor"] is None
    status, body = get(served, "/malformed-commands", failure_code="payload_too_large")
    assert status == 200 and body["items"] == []
    assert_error(*get(served, "/malformed-commands", failure_code="nope"), 400, "invalid_argument")
    assert_error(*get(served, "/malformed-commands", limit=1000), 400, "invalid_argument")


# -- GET /schedule --------------------------------------------------------------------------------
def test_schedule_summary(served: ServeProcess, sql: Conn) -> None:
    status, body = get(served, "/schedule")
    assert status == 200
    assert_conforms("Schedule", body)
    assert body == {"depth": 0, "oldest_age_ms": 0, "by_status": dict.fromkeys(
        ("queued", "rendered", "sending", "sent", "suppressed", "failed", "dead_letter", "cancelled"), 0)}

    now = datetime.now(UTC)
    insert_deliveries(sql, [
        delivery_row(status="queued", schedule_entered_at=now - timedelta(minutes=10)),
        delivery_row(status="rendered", schedule_entered_at=now - timedelta(minutes=3)),
        # send_at in the future: entered the schedule "later", does not make it older
        delivery_row(status="queued", schedule_entered_at=now + timedelta(days=3)),
        delivery_row(status="sending"),
        delivery_row(status="sent"), delivery_row(status="sent"),
        delivery_row(status="dead_letter"),
        # an old non-waiting delivery does not count for the age
        delivery_row(status="failed", schedule_entered_at=now - timedelta(days=9)),
    ])
    status, body = get(served, "/schedule")
    assert status == 200
    assert_conforms("Schedule", body)
    assert body["depth"] == 3
    assert body["by_status"] == {"queued": 2, "rendered": 1, "sending": 1, "sent": 2, "suppressed": 0,
                                 "failed": 1, "dead_letter": 1, "cancelled": 0}
    ten_minutes = 10 * 60 * 1000
    assert ten_minutes <= body["oldest_age_ms"] < ten_minutes + 60_000


def _wait_status(proc: ServeProcess, delivery_id: str, wanted: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(150):
        status, body = get(proc, f"/deliveries/{delivery_id}")
        assert status == 200, body
        if body["status"] == wanted:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{delivery_id} stayed {body.get('status')}, expected {wanted}")


def test_retried_dead_letter_and_failed_delivery_are_then_sent(served: ServeProcess, sql: Conn) -> None:
    """The engine (stub provider: a notification ends `sent`) picks retried deliveries up at once."""
    dead = insert_delivery(sql, status="dead_letter", status_reason="connection refused", attempt_count=5,
                           ladder_step=5)
    insert_payload(sql, dead, rendered=True, subject="Spring news", text="Hello Ada")
    for n in range(1, 6):
        insert_attempt(sql, dead, n, "transport_failed", "connection refused")
    insert_dead_letter(sql, dead, "connection refused")
    # failed before rendering: retried as queued, rendered from the catalog on its next attempt
    failed = insert_delivery(sql, status="failed", status_reason="render_failed: catalog was missing")
    insert_payload(sql, failed, rendered=False)

    for did in (dead, failed):
        status, body = served.http("POST", f"{API}/deliveries/{did}/retry")
        assert status == 202, body

    sent = _wait_status(served, dead, "sent")
    assert sent["dead_letter"] is None and sent["status_reason"] is None
    assert sent["attempts"][-1]["provider_summary"] == "stub"
    assert sent["attempt_count"] == 6
    assert [a["status"] for a in sent["attempts"]] == ["transport_failed"] * 5 + ["provider_accepted"]
    assert sent["message_id"] == f"<{dead}.test@example.com>"
    assert sql.execute("SELECT count(*) AS n FROM mail.dead_letters").fetchone() == {"n": 0}

    _wait_status(served, failed, "sent")
    status, content = get(served, f"/deliveries/{failed}/content")
    assert status == 200, content
    assert content["subject"] == "Spring news"
    assert "Hello Ada" in content["text"]
