"""The retry ladder end to end: delays between attempts, the dead letter after the last step, and
the same Message-ID on every attempt of a delivery."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer


def test_full_ladder_ends_in_a_dead_letter(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=[{"match": "^always-defer@", "action": "defer"}])
    env = smtp_env(service_env, server, MAIL_RETRY_LADDER="300ms,600ms")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery("ladder", to=["always-defer@example.com"])])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        row = h.wait_status(dsn, ["ladder"])["ladder"]
        assert proc.stop() == 0
    atts = h.attempts(dsn, "ladder")
    assert row["status"] == "dead_letter" and row["ladder_step"] == 2 and row["attempt_count"] == 3
    assert [a["status"] for a in atts] == ["provider_deferred"] * 3
    # step k waits ladder[k] before retry k + 1 (measured from the recorded finish to the next start)
    for earlier, later, delay in zip(atts, atts[1:], (0.3, 0.6), strict=False):
        gap = later["started_at"] - earlier["finished_at"]
        assert gap >= timedelta(seconds=delay) - timedelta(milliseconds=20), (gap, delay)
        assert gap < timedelta(seconds=delay + 1.5), (gap, delay)
    [dl] = h.query(dsn, "SELECT * FROM mail.dead_letters WHERE delivery_id = 'ladder'")
    assert dl["reason"] == f"retry ladder exhausted after 3 attempts: {atts[-1]['provider_summary']}"
    assert row["status_reason"] == atts[-1]["provider_summary"]
    retries = proc.find("attempt failed, retry scheduled")
    assert [line["retry_in_s"] for line in retries] == [0.3, 0.6]
    assert len(proc.find("delivery dead-lettered: retry ladder exhausted")) == 1
    assert all(len(line.get("otel_trace_id", "")) == 32 for line in retries)


def test_every_attempt_carries_the_same_message_id(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(rules=[
        {"match": "^dropped-twice@", "action": "drop", "times": 2},
        {"match": "^deferred-once@", "action": "data_defer", "times": 1},
    ])
    env = smtp_env(service_env, server, MAIL_RETRY_LADDER="100ms,100ms,100ms")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery("flaky-1", to=["dropped-twice@example.com"]),
                   h.delivery("flaky-2", to=["deferred-once@example.com"])])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        rows = h.wait_status(dsn, ["flaky-1", "flaky-2"])
        assert proc.stop() == 0
    assert rows["flaky-1"]["status"] == "sent" and rows["flaky-2"]["status"] == "sent"
    assert [a["status"] for a in h.attempts(dsn, "flaky-1")] == ["transport_failed", "transport_failed",
                                                                  "provider_accepted"]
    assert [a["status"] for a in h.attempts(dsn, "flaky-2")] == ["provider_deferred", "provider_accepted"]
    for did, seen in (("flaky-1", 3), ("flaky-2", 2)):
        mid = rows[did]["message_id"]
        events = [e for e in server.events() if e.get("message_id") == mid]
        assert len(events) == seen  # every attempt reached the DATA stage with the same Message-ID
        assert [e["event"] for e in events][-1] == "accepted"
        # the content is rendered once: every attempt sent the same body
        assert len({e["data"].split("\r\n\r\n", 1)[1] for e in events}) == 1
