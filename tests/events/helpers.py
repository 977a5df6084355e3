"""Helpers of the outcome-event tests: the event stream as a consumer reads it, the outbox as
PostgreSQL holds it, and the checks every test makes (nothing lost, order per delivery)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from tests.engine import helpers as h


def wait_until(predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def stream_events(client: Any, key: str) -> list[dict[str, str]]:
    """Every entry of the event stream in stream order, fields decoded, `id` added."""
    out = []
    for entry_id, fields in client.xrange(key, "-", "+"):
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        decoded["id"] = entry_id.decode()
        out.append(decoded)
    return out


def dedupe(events: list[dict[str, str]]) -> list[dict[str, str]]:
    """What a consumer that dedupes by event_id keeps: the first copy of each event."""
    seen: set[str] = set()
    out = []
    for e in events:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            out.append(e)
    return out


def by_delivery(events: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for e in events:
        out[e.get("delivery_id", "")].append(e)
    return dict(out)


def outbox(dsn: str) -> list[dict[str, Any]]:
    return h.query(dsn, "SELECT seq, event_id::text AS event_id, event, delivery_id, published_at "
                        "FROM mail.delivery_events ORDER BY seq")


def unpublished(dsn: str) -> int:
    return int(h.query(dsn, "SELECT count(*) AS n FROM mail.delivery_events WHERE published_at IS NULL")[0]["n"])


def assert_complete_and_ordered(dsn: str, events: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every outbox event is in the stream at least once, each delivery's events (first copies)
    in outbox order; returns the deduplicated events."""
    rows = outbox(dsn)
    kept = dedupe(events)
    assert {e["event_id"] for e in kept} == {r["event_id"] for r in rows}, "an event is missing or unknown"
    expected: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        expected[r["delivery_id"] or ""].append(r["event_id"])
    got = {d: [e["event_id"] for e in evs] for d, evs in by_delivery(kept).items()}
    for delivery_id, ids in expected.items():
        if delivery_id:
            assert got.get(delivery_id) == ids, f"events of {delivery_id} out of order"
    return kept
