"""Containment and provable ownership through real `mailtrio serve` processes: a delivery that
cannot be built or decoded fails alone, repeated interruption ends in a dead letter, a second
process with the same MAIL_INSTANCE_ID refuses to start, and a process stopped past its lease
sends nothing under that lease when it resumes."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.engine.test_containment import deep_row
from tests.engine.test_e2e_instances import instance
from tests.support.serve import ServeProcess, free_port
from tests.support.smtpserver import SmtpTestServer


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_a_poison_command_fails_alone_and_the_process_stays_up(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], redis_client: Any, stream_key: str
) -> None:
    server = smtp_factory(tls="none", auth=None)
    env = smtp_env(service_env, server)
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    # a row stored earlier whose payload is nested far past the recursion limit
    h.insert(dsn, [deep_row("deep-1")], notify=False)
    ordinary = [f"ord-{i}" for i in range(200)]
    entries = [h.entry(d, to=[f"user{i}@example.com"]) for i, d in enumerate(ordinary)]
    entries.insert(100, h.entry("poison-1", to=["josé@example.com"]))
    with ServeProcess(env) as proc:
        proc.wait_ready()
        h.xadd(redis_client, stream_key, entries)
        rows = h.wait_status(dsn, [*ordinary, "poison-1", "deep-1"], timeout=60)
        assert proc.proc.poll() is None  # still serving
        status, body = proc.http("GET", "/api/v1/internal/schedule")
        assert status == 200 and body["by_status"]["sending"] == 0
        assert proc.stop() == 0
    accepted = Counter(e["message_id"] for e in server.accepted())
    for d in ordinary:
        assert rows[d]["status"] == "sent" and accepted[rows[d]["message_id"]] == 1, d
    poison = rows["poison-1"]
    crashed = [line for line in proc.find("attempt crashed") if line.get("delivery_id") == "poison-1"]
    if poison["status"] == "failed":
        assert poison["status_reason"].startswith("build_failed: the message cannot be built: UnicodeEncodeError")
        assert len(crashed) == 1 and crashed[0]["phase"] == "build"
        assert accepted[poison["message_id"]] == 0
    else:  # the builder can represent it (SMTPUTF8): sent once
        assert poison["status"] == "sent" and accepted[poison["message_id"]] == 1
    deep = rows["deep-1"]
    assert deep["status"] == "failed" and deep["status_reason"].startswith("decode_failed:")
    assert [line["phase"] for line in proc.find("attempt crashed") if line.get("delivery_id") == "deep-1"] == ["decode"]
    assert not proc.find("runtime failure")


def test_a_delivery_whose_attempts_are_killed_three_times_is_dead_lettered(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    # The server never answers this recipient's message: each attempt is still running when its
    # process is killed, as if the delivery itself killed it (out of memory, a native crash).
    server = smtp_factory(tls="none", auth=None, rules=[{"match": r"^killer@", "action": "stall", "stall_s": 120}])
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="60s")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery("killer", to=["killer@example.com"])])
    for n in range(3):
        with ServeProcess(env) as proc:
            proc.wait_ready()
            # its n-th attempt is on its way (restart rescue recorded the previous one interrupted)
            until(lambda n=n: h.query(dsn, "SELECT 1 FROM mail.deliveries WHERE delivery_id = 'killer' "
                                           "AND status = 'sending' AND attempt_count = %s", [n]), 20,
                  f"attempt {n + 1} to start")
            proc.proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    with ServeProcess(env) as proc:
        proc.wait_ready()
        row = h.wait_status(dsn, ["killer"], timeout=20)["killer"]
        dead = proc.find("deliveries dead-lettered: repeatedly interrupted")
        assert proc.stop() == 0
    assert row["status"] == "dead_letter"
    assert row["status_reason"].startswith("repeatedly interrupted: 3 consecutive")
    assert [a["status"] for a in h.attempts(dsn, "killer")] == ["interrupted"] * 3
    [dl] = h.query(dsn, "SELECT reason FROM mail.dead_letters WHERE delivery_id = 'killer'")
    assert dl["reason"].startswith("repeatedly interrupted")
    assert dead and dead[0]["delivery_ids"] == ["killer"]
    assert not server.accepted()


def test_a_second_process_with_the_same_instance_id_exits_1_and_nothing_is_sent_twice(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(tls="none", auth=None, rules=[{"match": r"^slow", "action": "stall", "stall_s": 1}])
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="10s")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"s-{i}", to=[f"slow{i}@example.com"]) for i in range(16)])
    with ServeProcess(env) as first:
        first.wait_ready()
        h.wait_status(dsn, ids[:4], statuses=("sending",), timeout=15)  # live leases under the id
        clone = dict(env, MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}")
        started = time.monotonic()
        with ServeProcess(clone) as second:
            assert second.wait(20) == 1
        took = time.monotonic() - started
        rows = h.wait_status(dsn, ids, timeout=40)
        assert first.proc.poll() is None
        assert first.stop() == 0
    assert took < 15
    [line] = second.stderr.strip().splitlines()
    assert "MAIL_INSTANCE_ID" in line and env["MAIL_INSTANCE_ID"] in line and "already in use" in line, line
    events = second.events()
    assert "scheduler started" not in events and "command consumer started" not in events
    assert {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert set(accepted.values()) == {1} and len(accepted) == len(ids)
    assert not [a for a in h.attempts(dsn) if a["status"] != "provider_accepted"]


def test_a_process_stopped_past_its_lease_sends_nothing_under_it_when_continued(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    # RCPT answers take 0.4 s: the paused workers are between their claim and DATA.
    server = smtp_factory(tls="none", auth=None, rules=[{"match": r"^slow", "action": "slow_rcpt", "delay_s": 0.4}])
    # lease = MAIL_SMTP_TIMEOUT + 15 s = 16 s
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="1s", MAIL_RETRY_LADDER="100ms,200ms,500ms")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"z-{i}", to=[f"slow{i}@example.com"]) for i in range(40)])
    later = h.insert(dsn, [h.delivery("cancel-me", to=["slow-c@example.com"], delay_s=60)])
    with ExitStack() as stack:
        paused = stack.enter_context(ServeProcess(instance(env, "paused")))
        paused.wait_ready()
        server.wait_accepted(4)
        held = until(lambda: h.query(dsn, "SELECT delivery_id FROM mail.deliveries WHERE status = 'sending'"),
                     10, "deliveries in flight")
        paused.proc.send_signal(signal.SIGSTOP)
        stopped_at = datetime.now(UTC)
        try:
            other = stack.enter_context(ServeProcess(instance(env, "other")))
            other.wait_ready()
            # the operator cancels: a waiting delivery is cancelled; one the stopped process
            # holds is `sending` and refused
            assert other.http("POST", "/api/v1/internal/deliveries/cancel-me/cancel")[0] == 200
            still = h.query(dsn, "SELECT delivery_id FROM mail.deliveries WHERE status = 'sending' "
                                 "AND lease_owner LIKE '%%-paused'")
            assert still, "the stopped process holds leases"
            refused = still[0]["delivery_id"]
            assert other.http("POST", f"/api/v1/internal/deliveries/{refused}/cancel")[0] == 409
            # its leases expire while it is stopped; it is alive (identity lock held): nobody rescues
            until(lambda: h.query(dsn, "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM mail.deliveries WHERE "
                                       "status = 'sending' AND lease_expires_at > now() "
                                       "AND lease_owner LIKE '%%-paused')"), 25, "the paused leases to expire")
            time.sleep(1.0)
            assert not other.find("expired leases rescued; deliveries back on the schedule")
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        continued_at = datetime.now(UTC)
        rows = h.wait_status(dsn, ids, timeout=40)
        assert paused.proc.poll() is None and other.proc.poll() is None
        assert paused.stop() == 0 and other.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert h.deliveries(dsn, later)["cancel-me"]["status"] == "cancelled"
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert set(accepted.values()) == {1} and len(accepted) == len(ids)  # once each, the cancelled one never
    # nothing went out under a lease taken before the stop once it had ended: every message the
    # stopped process sent under such a lease reached the server before the stop
    reached = {e["message_id"]: e["ts"] for e in server.accepted()}
    by_id = h.deliveries(dsn)
    for a in h.attempts(dsn):
        if a["status"] == "provider_accepted" and a["instance_id"].endswith("-paused") \
                and a["started_at"] < continued_at:
            assert reached[by_id[a["delivery_id"]]["message_id"]] < stopped_at.timestamp() + 1.0, a
    # What the stopped process held when it was stopped ended, after the stop, in one of the
    # ways that send nothing under the old lease: given back unsent (the lease check, by the
    # worker or by the scheduler's buffer), cut by the
    # send window (`timed_out`), or its own rescue (`interrupted`: a claim whose reply came back
    # too late) - or its message had reached the server before the stop.
    ended = {a["delivery_id"]: a["status"] for a in h.attempts(dsn) if a["instance_id"].endswith("-paused")
             and a["started_at"] < stopped_at}
    given_back = {line["delivery_id"] for line in paused.find("delivery given back unsent")}
    # (a job still in the claim-ahead buffer leaves it unsent once its lease ran short)
    given_back |= {d for line in paused.find("claims given back") for d in line["delivery_ids"]}
    for did in (r["delivery_id"] for r in still):
        assert did in given_back or ended.get(did) in ("timed_out", "interrupted", "provider_accepted"), did
    assert {held_row["delivery_id"] for held_row in held} and refused in rows
