"""Listings under concurrent inserts, and cancel racing the scheduler's claim, on the real service."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg.rows import dict_row

from tests.api.conftest import API, delivery_row, insert_deliveries, insert_delivery, status_of
from tests.support.serve import ServeProcess

Conn = psycopg.Connection[dict[str, Any]]
Key = tuple[datetime, str]

# The scheduler's claim, restricted to one delivery and to a horizon past the test rows' due time
# (they are due tomorrow so the service's own scheduler leaves them to this test).
CLAIM = (
    "UPDATE mail.deliveries SET status = 'sending', lease_owner = 'x', lease_started_at = now(), "
    "lease_expires_at = now() + interval '1 minute', next_attempt_at = NULL "
    "WHERE delivery_id IN (SELECT delivery_id FROM mail.deliveries WHERE status IN ('queued', 'rendered') "
    "AND next_attempt_at <= now() + interval '2 days' AND delivery_id = %s FOR UPDATE SKIP LOCKED)"
)

WAITING_CANCELS = (
    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' AND query LIKE '%%cancelled by operator%%'"
)


def _pages(proc: ServeProcess, query: dict[str, Any], between_pages: Any = None) -> list[str]:
    seen: list[str] = []
    cursor = None
    for page in range(200):
        q = dict(query)
        if cursor:
            q["cursor"] = cursor
        status, body = proc.http("GET", f"{API}/deliveries?{urlencode(q)}")
        assert status == 200, body
        seen += [d["delivery_id"] for d in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        if between_pages is not None:
            between_pages(page, seen)
    raise AssertionError("pagination did not end")


def test_pagination_over_thousands_of_rows_with_concurrent_inserts(served: ServeProcess, sql: Conn) -> None:
    base = datetime.now(UTC) - timedelta(days=1)
    rng = random.Random(7)
    # 3,000 rows over 300 distinct instants: ties are broken by delivery_id
    rows = [delivery_row(status=rng.choice(["sent", "sent", "failed", "queued"]),
                         created_at=base + timedelta(milliseconds=i // 10)) for i in range(3000)]
    insert_deliveries(sql, rows)
    keys: dict[str, Key] = {r["delivery_id"]: (r["created_at"], r["delivery_id"]) for r in rows}
    original = set(keys)
    sent = {r["delivery_id"] for r in rows if r["status"] == "sent"}

    stop = threading.Event()
    concurrent: dict[str, Key] = {}
    lock = threading.Lock()

    def insert_concurrently() -> None:
        with psycopg.connect(served.env["MAIL_POSTGRES_PRIMARY_DSN"], autocommit=True) as conn:
            for i in range(5000):
                if stop.is_set():
                    return
                # new rows at the top, and rows in the middle of the range already listed or not
                created = datetime.now(UTC) if i % 2 else base + timedelta(milliseconds=rng.randrange(300),
                                                                            microseconds=rng.randrange(1000))
                row = delivery_row(status="sent", created_at=created)
                insert_deliveries(conn, [row])
                with lock:
                    concurrent[row["delivery_id"]] = (created, row["delivery_id"])

    inserter = threading.Thread(target=insert_concurrently, daemon=True)
    inserter.start()
    try:
        ahead: list[str] = []
        behind: list[str] = []

        def insert_around_cursor(page: int, seen: list[str]) -> None:
            # After the first page: one row just past the cursor (still to be listed) and one
            # just before it (already passed): the first must appear, the second must not.
            if page != 0:
                return
            at = keys[seen[-1]][0]
            row_ahead = delivery_row(status="sent", created_at=at - timedelta(microseconds=1))
            row_behind = delivery_row(status="sent", created_at=at + timedelta(microseconds=1))
            insert_deliveries(sql, [row_ahead, row_behind])
            ahead.append(row_ahead["delivery_id"])
            behind.append(row_behind["delivery_id"])
            with lock:
                for r in (row_ahead, row_behind):
                    concurrent[r["delivery_id"]] = (r["created_at"], r["delivery_id"])

        listed = _pages(served, {"limit": 137}, insert_around_cursor)
        listed_sent = _pages(served, {"limit": 61, "status": "sent"})
    finally:
        stop.set()
        inserter.join(10)
    assert concurrent, "the concurrent inserter made no rows"

    with lock:
        keys.update(concurrent)
    for seen, expected in ((listed, original), (listed_sent, sent)):
        assert len(seen) == len(set(seen)), "a row was listed twice"
        assert expected <= set(seen), f"{len(expected - set(seen))} rows were skipped"
        assert set(seen) <= set(keys), "an unknown row was listed"
        order = [keys[d] for d in seen]
        assert order == sorted(order, reverse=True), "not newest first"
    assert ahead[0] in listed
    assert behind[0] not in listed


def test_cancel_racing_a_claim_has_exactly_one_winner(served: ServeProcess, sql: Conn) -> None:
    dsn = served.env["MAIL_POSTGRES_PRIMARY_DSN"]
    wins = {"cancel": 0, "claim": 0}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as claimer:
        for i in range(60):
            did = insert_delivery(sql, status="queued" if i % 2 else "rendered")
            barrier = threading.Barrier(2, timeout=10)
            result: dict[str, Any] = {}

            def cancel(did: str = did, barrier: threading.Barrier = barrier, result: dict[str, Any] = result) -> None:
                barrier.wait()
                result["cancel"] = served.http("POST", f"{API}/deliveries/{did}/cancel")[0]

            thread = threading.Thread(target=cancel)
            thread.start()
            barrier.wait()
            if i % 3 == 0:
                time.sleep(random.uniform(0, 0.01))
            claimed = claimer.execute(CLAIM, (did,)).rowcount
            thread.join(15)
            assert not thread.is_alive()
            final = status_of(sql, did)
            if claimed == 1:
                assert result["cancel"] == 409, (i, result)
                assert final == "sending"
                wins["claim"] += 1
            else:
                assert claimed == 0
                assert result["cancel"] == 200, (i, result)
                assert final == "cancelled"
                wins["cancel"] += 1
    assert wins["cancel"] + wins["claim"] == 60


def test_cancel_waits_for_an_uncommitted_claim_and_loses(served: ServeProcess, sql: Conn) -> None:
    """The claim locked the row first: cancel blocks on the lock, then re-checks and finds `sending`."""
    did = insert_delivery(sql, status="rendered")
    result: dict[str, Any] = {}
    with psycopg.connect(served.env["MAIL_POSTGRES_PRIMARY_DSN"], row_factory=dict_row) as claimer:
        assert claimer.execute(CLAIM, (did,)).rowcount == 1  # in an open transaction
        thread = threading.Thread(
            target=lambda: result.update(cancel=served.http("POST", f"{API}/deliveries/{did}/cancel")))
        thread.start()
        # the cancel is waiting on the row lock: it cannot have answered
        blocked = 0
        for _ in range(200):
            row = sql.execute(WAITING_CANCELS).fetchone()
            blocked = row["n"] if row else 0
            if blocked:
                break
            time.sleep(0.05)
        assert blocked == 1
        assert "cancel" not in result
        claimer.commit()
    thread.join(15)
    status, body = result["cancel"]
    assert status == 409 and body["error"]["code"] == "conflict"
    assert status_of(sql, did) == "sending"


def test_claim_skips_a_cancelled_delivery(served: ServeProcess, sql: Conn) -> None:
    did = insert_delivery(sql, status="queued")
    assert served.http("POST", f"{API}/deliveries/{did}/cancel")[0] == 200
    assert sql.execute(CLAIM, (did,)).rowcount == 0
    assert status_of(sql, did) == "cancelled"
