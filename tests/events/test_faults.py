"""Bad conditions: the publishing instance killed mid-stream, Redis restarted mid-run. Every event
reaches the stream at least once, each delivery's in order, and a consumer deduping by event_id
sees exactly one event per change."""

from __future__ import annotations

import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from tests.engine import helpers as h
from tests.events import helpers as ev
from tests.support.serve import ServeProcess, free_port

FINAL = {"authsession": "suppressed", "notification": "sent"}


def assert_one_event_per_change(dsn: str, kept: list[dict[str, str]], ids: list[str]) -> None:
    """Stub mode: accepted, then deferred only for attempts interrupted by a death, then final."""
    rows = h.deliveries(dsn, ids)
    by = ev.by_delivery(kept)
    for delivery_id in ids:
        row = rows[delivery_id]
        events = by[delivery_id]
        assert events[0]["event"] == "accepted" and events[-1]["event"] == FINAL[row["source"]], events
        middle = events[1:-1]
        assert all(e["event"] == "deferred" and e["attempt_status"] == "interrupted" for e in middle), events
        # one event per attempt, one for the acceptance
        assert len(events) == row["attempt_count"] + 1, (events, row["attempt_count"])
        assert [e["attempt_no"] for e in events] == [str(n) for n in range(len(events))]


def commands(prefix: str, n: int, **kw: Any) -> list[dict[str, str]]:
    return [h.entry(f"{prefix}-{i}", source="authsession" if i % 3 == 0 else "notification", **kw)
            for i in range(n)]


def test_publisher_killed_mid_stream_another_takes_over(
    service_env: dict[str, str], redis_client: redis.Redis
) -> None:
    events_key = f"{service_env['MAIL_REDIS_COMMAND_STREAM']}:events"
    env = {**service_env, "MAIL_REDIS_EVENT_STREAM": events_key, "MAIL_SMTP_TIMEOUT": "1s"}
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    key = env["MAIL_REDIS_COMMAND_STREAM"]
    envs = [{**env, "MAIL_INSTANCE_ID": f"ev-{name}-{uuid.uuid4().hex[:6]}",
             "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{free_port()}"} for name in ("a", "b")]
    ids = [f"k-{i}" for i in range(1200)]
    try:
        with ServeProcess(envs[0]) as a, ServeProcess(envs[1]) as b:
            a.wait_ready()
            b.wait_ready()
            publisher = ev.wait_until(lambda: next((p for p in (a, b) if p.find("event publisher active")), None),
                                      what="one publisher")
            survivor = b if publisher is a else a
            assert not survivor.find("event publisher active")
            h.xadd(redis_client, key, commands("k", 600))
            # kill the publisher while it publishes: some events out, more waiting
            ev.wait_until(lambda: redis_client.xlen(events_key) > 50, what="publishing under way")
            publisher.proc.send_signal(signal.SIGKILL)
            publisher.proc.wait(10)
            survivor.wait_for("event publisher active", timeout=20)
            h.xadd(redis_client, key, [h.entry(f"k-{i}", source="authsession" if i % 3 == 0 else "notification")
                                       for i in range(600, 1200)])
            # the dead instance's leases expire (MAIL_SMTP_TIMEOUT + 15 s) and are rescued
            h.wait_status(dsn, ids, timeout=90)
            ev.wait_until(lambda: ev.unpublished(dsn) == 0, timeout=30, what="outbox drained")
            assert survivor.stop() == 0
        stream = ev.stream_events(redis_client, events_key)
        kept = ev.assert_complete_and_ordered(dsn, stream)
        assert len(kept) == len(ev.outbox(dsn))
        assert_one_event_per_change(dsn, kept, ids)
    finally:
        redis_client.delete(events_key)


def test_redis_restart_events_wait_in_the_outbox_and_drain_in_order(
    service_env: dict[str, str], persistent_redis: Any
) -> None:
    env = {**service_env, "MAIL_REDIS_MASTER_ADDR": persistent_redis.addr}
    events_key = env.get("MAIL_REDIS_EVENT_STREAM", "mail:delivery_events")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    key = env["MAIL_REDIS_COMMAND_STREAM"]
    due = datetime.now(UTC) + timedelta(seconds=12)
    now_ids = [f"n-{i}" for i in range(100)]
    later_ids = [f"l-{i}" for i in range(100)]
    with ServeProcess(env) as proc:
        proc.wait_ready()
        proc.wait_for("event publisher active")
        client = persistent_redis.client()
        h.xadd(client, key, commands("n", 100) + commands("l", 100, send_at=due))
        h.wait_status(dsn, now_ids, timeout=30)
        ev.wait_until(lambda: client.xlen(events_key) >= 300, what="the first events published")
        client.close()
        persistent_redis.stop()
        # Redis is down: deliveries still go out (the scheduled ones, and these written straight
        # to PostgreSQL), and their events wait in the outbox
        while_down = h.insert(dsn, [h.delivery(f"p-{i}") for i in range(50)])
        h.wait_status(dsn, later_ids + while_down, timeout=60)
        proc.wait_for("event publish failed; events wait in the outbox", timeout=30)
        assert ev.unpublished(dsn) >= 2 * len(while_down)
        status, body = proc.http("GET", "/api/v1/internal/events/outbox")
        assert status == 200 and body["depth"] >= 100 and body["oldest_age_ms"] > 0
        persistent_redis.start()
        ev.wait_until(lambda: ev.unpublished(dsn) == 0, timeout=60, what="outbox drained after the restart")
        proc.wait_for("event publisher recovered")
        assert proc.stop() == 0
    client = persistent_redis.client()
    stream = ev.stream_events(client, events_key)
    client.close()
    kept = ev.assert_complete_and_ordered(dsn, stream)
    assert len(kept) == len(ev.outbox(dsn)) == 500
    assert_one_event_per_change(dsn, kept, now_ids + later_ids + [f"p-{i}" for i in range(50)])


def test_shutdown_with_redis_down_is_bounded_and_loses_nothing(
    service_env: dict[str, str], persistent_redis: Any
) -> None:
    env = {**service_env, "MAIL_REDIS_MASTER_ADDR": persistent_redis.addr, "MAIL_SHUTDOWN_TIMEOUT": "6s"}
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    with ServeProcess(env) as proc:
        proc.wait_ready()
        proc.wait_for("event publisher active")
        persistent_redis.stop()
        # deliveries written while Redis is down: delivered, their events wait in the outbox
        ids = h.insert(dsn, [h.delivery(f"sd-{i}") for i in range(20)])
        h.wait_status(dsn, ids, timeout=30)
        proc.wait_for("event publish failed; events wait in the outbox", timeout=30)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 6 + 6  # the bound, plus closing connections
        stopped = proc.wait_for("event publisher stopped")
        assert stopped["was_publishing"] is True
    assert ev.unpublished(dsn) == 40  # accepted and sent, for the next publisher
