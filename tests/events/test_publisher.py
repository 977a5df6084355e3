"""The event publisher in process, against real PostgreSQL and Redis: a crash between the XADD and
the mark, one publisher at a time and the takeover, the drain at stop, the gauges, the counter
and the retention of published rows."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import redis
import trio

from mailtrio import telemetry
from mailtrio.config import Settings
from mailtrio.events import Publisher
from mailtrio.retention import Retention
from mailtrio.store import Database
from tests.engine import helpers as h
from tests.events import helpers as ev


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    env = {**service_env, "MAIL_REDIS_EVENT_STREAM": service_env["MAIL_REDIS_COMMAND_STREAM"] + ":events"}
    return Settings.from_env(env)


@pytest.fixture
def events_key(settings: Settings, redis_client: redis.Redis) -> Any:
    yield settings.event_stream
    redis_client.delete(settings.event_stream)


def _metrics(reader: Any) -> dict[str, Any]:
    data = reader.get_metrics_data()
    return {m.name: m.data for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics
            for m in sm.metrics}


def _published(reader: Any, event: str) -> int:
    metric = _metrics(reader).get("mail.events.published")
    if metric is None:
        return 0
    return sum(int(p.value) for p in metric.data_points if dict(p.attributes or {}) == {"event": event})


async def test_a_crash_between_xadd_and_mark_republishes_the_same_event_ids(
    settings: Settings, db: Database, database: str, redis_client: redis.Redis, events_key: str,
    metric_reader: Any,
) -> None:
    h.insert(database, [h.delivery(f"c{i}") for i in range(3)])
    dying = Publisher(settings, db)
    assert await dying.outbox.try_lock()
    batch = await dying.outbox.fetch(10)
    await dying.stream.add_json_batch(events_key, [e.entry for e in batch])
    # the process dies here: its session (and lock) ends, nothing was marked published
    await dying.outbox.close()
    await dying.stream.close()
    assert ev.unpublished(database) == 3

    before = _published(metric_reader, "accepted")
    heir = Publisher(settings, db)
    try:
        assert await heir.outbox.try_lock()
        assert await heir.publish_once() == 3
        assert await heir.publish_once() == 0
    finally:
        await heir.outbox.close()
        await heir.stream.close()
    assert ev.unpublished(database) == 0
    assert _published(metric_reader, "accepted") - before == 3
    stream = ev.stream_events(redis_client, events_key)
    assert len(stream) == 6
    assert [e["event_id"] for e in stream[:3]] == [e["event_id"] for e in stream[3:]]
    assert [{k: v for k, v in e.items() if k != "id"} for e in stream[:3]] == \
        [{k: v for k, v in e.items() if k != "id"} for e in stream[3:]]
    kept = ev.assert_complete_and_ordered(database, stream)
    assert len(kept) == 3


async def test_one_publisher_at_a_time_and_a_quick_takeover(
    settings: Settings, db: Database, database: str, redis_client: redis.Redis, events_key: str
) -> None:
    first = Publisher(settings, db)
    assert await first.outbox.try_lock()
    second = Publisher(settings, db, lock_retry=0.2, poll_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        h.insert(database, [h.delivery("t1")])
        await trio.sleep(1.0)
        assert not second.active and ev.unpublished(database) == 1  # the first holds the lock
        await first.outbox.close()  # the first publisher dies
        for _ in range(200):  # within seconds (10 s at most)
            if not ev.unpublished(database):
                break
            await trio.sleep(0.05)
        assert second.active
        # at stop, what is still unpublished goes out before run returns
        h.insert(database, [h.delivery(f"t{i}") for i in range(2, 40)])
        second.stop(within=10.0)
    await first.stream.close()
    assert not second.active and ev.unpublished(database) == 0
    assert redis_client.xlen(events_key) == 39


async def test_publisher_off_never_publishes(
    settings: Settings, db: Database, database: str, redis_client: redis.Redis, events_key: str
) -> None:
    off = Publisher(dataclasses.replace(settings, events_publisher=False), db, lock_retry=0.1)
    h.insert(database, [h.delivery("o1")])
    async with trio.open_nursery() as nursery:
        await nursery.start(off.run)
        await trio.sleep(1.0)
        off.stop(within=1.0)
    assert ev.unpublished(database) == 1 and redis_client.xlen(events_key) == 0


def _gauge(reader: Any, name: str) -> float:
    [point] = _metrics(reader)[name].data_points
    return float(point.value)


async def test_gauges_and_retention_of_published_rows(
    settings: Settings, db: Database, database: str, events_key: str, metric_reader: Any
) -> None:
    h.insert(database, [h.delivery(f"g{i}") for i in range(5)])
    h.query(database, "UPDATE mail.delivery_events SET created_at = now() - interval '3 seconds' RETURNING 1")
    publisher = Publisher(settings, db)
    snapshot = await publisher.refresh_gauges()
    assert snapshot.depth == 5 and 3000 <= snapshot.oldest_age_ms < 60_000
    assert telemetry.outbox_snapshot.depth == 5
    assert _gauge(metric_reader, "mail.events.outbox.depth") == 5
    assert 3000 <= _gauge(metric_reader, "mail.events.outbox.oldest_age_ms") < 60_000
    try:
        assert await publisher.outbox.try_lock()
        assert await publisher.publish_once() == 5
    finally:
        await publisher.outbox.close()
        await publisher.stream.close()
    snapshot = await publisher.refresh_gauges()
    assert (snapshot.depth, snapshot.oldest_age_ms) == (0, 0)
    assert _gauge(metric_reader, "mail.events.outbox.depth") == 0

    # published two days ago: past MAIL_EVENT_OUTBOX_RETENTION (24h); one more, old but unpublished
    h.query(database, "UPDATE mail.delivery_events SET published_at = now() - interval '2 days' RETURNING 1")
    h.insert(database, [h.delivery("g-unpublished")])
    h.query(database, "UPDATE mail.delivery_events SET created_at = now() - interval '3 days' "
                      "WHERE published_at IS NULL RETURNING 1")
    counts = await Retention(settings, db).run_once()
    assert counts.delivery_events == 5
    assert [r["delivery_id"] for r in ev.outbox(database)] == ["g-unpublished"]


async def test_entries_are_binary_safe_and_keep_unicode(
    settings: Settings, db: Database, redis_client: redis.Redis, events_key: str
) -> None:
    """Entries travel as JSON text to a script that XADDs them: any character survives, CR LF
    included, whether the JSON escapes non-ASCII characters or not."""
    publisher = Publisher(settings, db)
    values = {"event_id": "e-1", "event": "deferred", "reason": "451 réessayez plus tard — 稍后重试",
              "reply": "line one\r\nline two $3\r\n*2 \"quoted\" \\", "empty": "", "emoji": "✉️"}
    try:
        added = await publisher.stream.add_json_batch(
            events_key, [json.dumps(values), json.dumps(values, ensure_ascii=False),
                         json.dumps({"event_id": "e-2", "event": "sent"})],
            maxlen=1000, min_id="0-1")
    finally:
        await publisher.stream.close()
    assert added == 3
    first, second, third = ev.stream_events(redis_client, events_key)
    assert {k: v for k, v in first.items() if k != "id"} == values
    assert {k: v for k, v in second.items() if k != "id"} == values
    assert third["event_id"] == "e-2" and first["id"] < second["id"] < third["id"]
