"""Every event type end to end: commands on the stream, `mailtrio serve` against the real SMTP test
server, operator verbs over HTTP, events read back from the event stream and `mailtrio events tail`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.events import helpers as ev
from tests.events.schema import assert_documented
from tests.support.serve import ROOT, ServeProcess
from tests.support.smtpserver import SmtpTestServer

API = "/api/v1/internal"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
RULES = [
    {"match": r"^flaky@", "action": "defer", "times": 2},
    {"match": r"^never@", "action": "defer"},
    {"match": r"^bounce@", "action": "reject"},
    {"match": r"^supp@", "action": "suppress"},
]


def test_every_event_type_in_order(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], redis_client: redis.Redis
) -> None:
    server = smtp_factory(rules=RULES)
    events_key = service_env["MAIL_REDIS_COMMAND_STREAM"] + ":events"
    env = smtp_env(service_env, server, MAIL_RETRY_LADDER="1s,1s", MAIL_REDIS_EVENT_STREAM=events_key)
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    key = env["MAIL_REDIS_COMMAND_STREAM"]
    later = datetime.now(UTC) + timedelta(hours=1)
    try:
        with ServeProcess(env) as proc:
            proc.wait_ready()
            proc.wait_for("event publisher active")
            h.xadd(redis_client, key, [
                h.entry("e-sent", to=["ok@example.com"], source="authsession", traceparent=TP),
                h.entry("e-flaky", to=["flaky@example.com"]),
                h.entry("e-never", to=["never@example.com"]),
                h.entry("e-bounce", to=["bounce@example.com"]),
                h.entry("e-supp", to=["supp@example.com"]),
                h.entry("e-cancel", to=["ok@example.com"], send_at=later),
                {**h.entry("e-bad"), "payload": "{not json", "traceparent": TP},
            ])
            h.wait_status(dsn, ["e-sent", "e-flaky", "e-never", "e-bounce", "e-supp"], timeout=60)
            status, _ = proc.http("POST", f"{API}/deliveries/e-cancel/cancel")
            assert status == 200
            status, _ = proc.http("POST", f"{API}/deliveries/e-bounce/retry")
            assert status == 202
            ev.wait_until(lambda: [e["event"] for e in ev.outbox(dsn) if e["delivery_id"] == "e-bounce"]
                          == ["accepted", "failed", "retried", "failed"], timeout=30, what="the retried bounce")
            ev.wait_until(lambda: ev.unpublished(dsn) == 0 and len(ev.outbox(dsn)) > 0, what="outbox drained")
            status, body = proc.http("GET", f"{API}/events/outbox")
            assert status == 200
            assert body == {"depth": 0, "oldest_age_ms": 0, "publisher": env["MAIL_INSTANCE_ID"]}
            assert proc.stop() == 0
            assert proc.find("event publisher started") and proc.find("event publisher stopped")

        stream = ev.stream_events(redis_client, events_key)
        kept = ev.assert_complete_and_ordered(dsn, stream)
        assert len(stream) == len(kept), "a clean run publishes every event once"
        got = {d: [e["event"] for e in evs] for d, evs in ev.by_delivery(kept).items()}
        assert got == {
            "e-sent": ["accepted", "sent"],
            "e-flaky": ["accepted", "deferred", "deferred", "sent"],
            "e-never": ["accepted", "deferred", "deferred", "dead_letter"],
            "e-bounce": ["accepted", "failed", "retried", "failed"],
            "e-supp": ["accepted", "suppressed"],
            "e-cancel": ["accepted", "cancelled"],
            "e-bad": ["rejected"],
        }
        by = ev.by_delivery(kept)
        for e in kept:
            assert_documented(e)
            assert set(e) >= {"id", "event_id", "event", "occurred_at"}
            assert e["occurred_at"].endswith("Z") and len(e["occurred_at"]) == 24
        sent = by["e-sent"]
        assert all(e["traceparent"] == TP for e in sent)
        wanted = {"delivery_id": "e-sent", "source": "authsession", "idempotency_key": "key-e-sent",
                  "status": "sent", "attempt_no": "1", "attempt_status": "provider_accepted"}
        assert {k: sent[1].get(k) for k in wanted} == wanted
        flaky_row = h.deliveries(dsn, ["e-flaky"])["e-flaky"]
        assert all(e.get("traceparent") == flaky_row["traceparent"] for e in by["e-flaky"])
        d1, d2 = by["e-flaky"][1:3]
        assert (d1["attempt_no"], d2["attempt_no"]) == ("1", "2")
        assert d1["reply"].startswith("451") and d1["attempt_status"] == "provider_deferred"
        assert d1["status"] == "rendered" and d1["next_attempt_at"] > d1["occurred_at"]
        assert by["e-never"][-1]["status"] == "dead_letter" and by["e-never"][-1]["attempt_no"] == "3"
        assert by["e-bounce"][1]["reason"].startswith("550")
        assert by["e-bounce"][2]["previous_status"] == "failed"
        assert by["e-cancel"][1]["reason"] == "cancelled by operator"
        [rejected] = by["e-bad"]
        assert rejected["failure_code"] == "invalid_json" and rejected["source"] == "notification"
        assert rejected["idempotency_key"] == "key-e-bad" and rejected["traceparent"] == TP
        assert rejected["failure_detail"] and "status" not in rejected

        # `mailtrio events tail` prints the same events as JSON lines
        out = subprocess.run(
            [sys.executable, "-m", "mailtrio", "events", "tail", "--from", "0", "--delivery-id", "e-flaky",
             "--count", "4", "--timeout", "20"],
            env={**env}, capture_output=True, text=True, timeout=60, cwd=str(ROOT), check=True,
        ).stdout
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines == by["e-flaky"]
        assert all(list(line)[:4] == ["id", "event_id", "event", "delivery_id"] for line in lines)
    finally:
        redis_client.delete(events_key)


def test_tail_reports_configuration_errors() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    done = subprocess.run([sys.executable, "-m", "mailtrio", "events", "tail"], env=env, capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT))
    assert done.returncode == 2 and "MAIL_REDIS_MASTER_ADDR" in done.stderr
    bad_from = subprocess.run([sys.executable, "-m", "mailtrio", "events", "tail", "--from", "latest"],
                              env={**env, "MAIL_REDIS_MASTER_ADDR": "127.0.0.1:6379"}, capture_output=True,
                              text=True, timeout=30, cwd=str(ROOT))
    assert bad_from.returncode == 2 and "--from" in bad_from.stderr


def test_tail_exits_1_when_redis_is_unreachable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(MAIL_REDIS_MASTER_ADDR=f"127.0.0.1:{port}", MAIL_REDIS_EVENT_STREAM="mail:tail-down")
    done = subprocess.run([sys.executable, "-m", "mailtrio", "events", "tail", "--timeout", "5"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert done.returncode == 1, done
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert "'mail:tail-down'" in done.stderr and f"127.0.0.1:{port}" in done.stderr


def test_tail_from_now_prints_only_new_events(redis_client: redis.Redis, stream_key: str) -> None:
    key = f"{stream_key}:events"
    redis_client.xadd(key, {"event_id": "old", "event": "accepted"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(MAIL_REDIS_MASTER_ADDR=f"{redis_client.connection_pool.connection_kwargs['host']}:"
                                      f"{redis_client.connection_pool.connection_kwargs['port']}",
               MAIL_REDIS_EVENT_STREAM=key)
    tail = subprocess.Popen([sys.executable, "-m", "mailtrio", "events", "tail", "--count", "1", "--timeout", "30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        # the tail resolves `$` when it starts; entries added after that are printed
        ev.wait_until(lambda: any(c.get("name") == "mailtrio:events-tail" and c.get("cmd") == "xread"
                                  for c in redis_client.client_list()), timeout=20, what="the tail reading")
        new_id = redis_client.xadd(key, {"event_id": "new", "event": "sent", "delivery_id": "d-1"}).decode()
        out, err = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"id": new_id, "event_id": "new", "event": "sent", "delivery_id": "d-1"}]
