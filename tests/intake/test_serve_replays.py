"""Republished and re-read commands through the real `mailtrio serve` process (#12.5, #12.6):
idempotency outlives a scheduled send's wait, and a consumer group re-created on an untrimmed
stream sends nothing twice."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from tests.intake.conftest import Tables, entry, payload
from tests.intake.test_serve import group_drained, wait_until
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer


def test_a_republished_scheduled_command_is_never_a_second_delivery(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    env = {**service_env, "MAIL_IDEMPOTENCY_TTL": "1s", "MAIL_RETENTION_INTERVAL": "1s"}
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat(timespec="seconds")
    command = entry(delivery_id="later-1", idempotency_key="k-later", send_at=later)
    with ServeProcess(env) as proc:
        proc.wait_ready()
        redis_client.xadd(stream_key, command)  # type: ignore[arg-type]
        wait_until(lambda: "later-1" in tables.deliveries(), what="the scheduled delivery")
        # well past the TTL: retention ran several times and the stream was trimmed
        time.sleep(2.5)
        proc.wait_for("sql retention run", count=3)
        assert tables.count("idempotency_reservations") == 1
        redis_client.xadd(stream_key, command)  # type: ignore[arg-type]
        other = dict(command, payload=json.dumps(payload(variables={"code": "999999"})))
        other_id = redis_client.xadd(stream_key, other).decode()  # type: ignore[arg-type]
        moved = dict(command, delivery_id="later-2")
        redis_client.xadd(stream_key, moved)  # type: ignore[arg-type]
        wait_until(lambda: group_drained(redis_client, stream_key), what="stream drained")
        dup = proc.wait_for("stream command duplicate")
        assert dup["delivery_id"] == "later-1"
        wait_until(lambda: len(tables.malformed()) == 2, what="two conflicts recorded")
        assert proc.stop() == 0
    assert set(tables.deliveries()) == {"later-1"}
    rows = tables.malformed()
    assert {r["failure_code"] for r in rows.values()} == {"idempotency_conflict"}
    assert rows[other_id]["delivery_id"] == "later-1"


def test_a_group_recreated_on_an_untrimmed_stream_sends_nothing_twice(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables, tmp_path: Path
) -> None:
    with SmtpTestServer(tmp_path, tls="none") as smtp:
        env = {**service_env, "MAIL_IDEMPOTENCY_TTL": "3s", "MAIL_SMTP_MODE": "smtp", "MAIL_SMTP_TLS": "none",
               "MAIL_SMTP_ADDR": smtp.addr, "MAIL_SMTP_FROM": "Mail <no-reply@mailtrio.test>"}
        first = [entry(delivery_id=f"g-{i}", source="notification",
                       payload_obj={"template_id": "newsletter", "to": [f"r{i}@example.com"],
                                    "variables": {"title": f"T{i}", "intro": "x"}}) for i in range(5)]
        with ServeProcess(env) as proc:
            proc.wait_ready()
            ids = [redis_client.xadd(stream_key, e).decode() for e in first]  # type: ignore[arg-type]
            smtp.wait_accepted(5)
            assert proc.stop() == 0
        # the service is down, so nothing trims the stream; the TTL passes and the group is lost
        time.sleep(3.5)
        redis_client.xgroup_destroy(stream_key, "mailservice")
        assert redis_client.xlen(stream_key) == 5
        with ServeProcess(env) as proc:
            proc.wait_ready()
            proc.wait_for("stream command rejected", count=5)
            fresh = entry(delivery_id="g-new", source="notification",
                          payload_obj={"template_id": "newsletter", "to": ["new@example.com"],
                                       "variables": {"title": "New", "intro": "x"}})
            redis_client.xadd(stream_key, fresh)  # type: ignore[arg-type]
            smtp.wait_accepted(6)
            wait_until(lambda: group_drained(redis_client, stream_key), what="stream drained")
            # the stale entries, acknowledged and older than the TTL, are trimmed
            wait_until(lambda: redis_client.xlen(stream_key) <= 1, what="stream trimmed")
            assert proc.stop() == 0
        counts = {mid: len(v) for mid, v in smtp.accepted_by_message_id().items()}
        assert len(counts) == 6 and set(counts.values()) == {1}
    rows = tables.malformed()
    assert sorted(rows) == sorted(ids)
    assert {r["failure_code"] for r in rows.values()} == {"stale_command"}
    assert set(tables.deliveries()) == {*(f"g-{i}" for i in range(5)), "g-new"}
