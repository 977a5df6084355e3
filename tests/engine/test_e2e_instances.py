"""Several instances on one stream and schema: scheduled sends fire once and on time, authsession
overtakes a notification backlog, and every delivery reaches the server exactly once."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.support.serve import ServeProcess, free_port
from tests.support.smtpserver import SmtpTestServer


def instance(env: dict[str, str], name: str) -> dict[str, str]:
    out = dict(env)
    out.update(MAIL_INSTANCE_ID=f"{env['MAIL_INSTANCE_ID']}-{name}", MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}")
    return out


def test_scheduled_send_fires_once_on_time_with_two_instances(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], redis_client: Any, stream_key: str
) -> None:
    server = smtp_factory()
    env = smtp_env(service_env, server)
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    with ExitStack() as stack:
        procs = [stack.enter_context(ServeProcess(instance(env, n))) for n in ("a", "b")]
        for p in procs:
            p.wait_ready()
        send_at = datetime.now(UTC) + timedelta(seconds=3)
        h.xadd(redis_client, stream_key, [
            h.entry("scheduled-1", send_at=send_at),
            h.entry("scheduled-2", source="authsession", send_at=send_at + timedelta(milliseconds=500)),
        ])
        time.sleep(1.5)
        early = h.deliveries(dsn)
        assert {r["status"] for r in early.values()} == {"queued"}, early  # accepted, not yet due
        rows = h.wait_status(dsn, ["scheduled-1", "scheduled-2"], timeout=15)
        for p in procs:
            assert p.stop() == 0
    for did, due in (("scheduled-1", send_at), ("scheduled-2", send_at + timedelta(milliseconds=500))):
        assert rows[did]["status"] == "sent"
        [attempt] = h.attempts(dsn, did)
        assert due <= attempt["started_at"] < due + timedelta(seconds=1), (did, attempt["started_at"] - due)
        assert len(server.accepted_by_message_id()[rows[did]["message_id"]]) == 1


@pytest.mark.slow
def test_authsession_overtakes_a_notification_backlog(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory()
    env = smtp_env(service_env, server, MAIL_ATTEMPT_WORKER_CONCURRENCY="8")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    backlog = 10_000
    h.insert(dsn, [h.delivery(f"news-{i}", template_id="newsletter",
                              variables={"title": f"Issue {i}", "intro": "Hello"}) for i in range(backlog)])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        server.wait_accepted(100)
        h.insert(dsn, [h.delivery("login", source="authsession", variables={"code": "424242"})])
        inserted = h.query(dsn, "SELECT created_at FROM mail.deliveries WHERE delivery_id = 'login'")[0]["created_at"]
        row = h.wait_status(dsn, ["login"], timeout=10)["login"]
        done_then = h.query(dsn, "SELECT count(*) AS n FROM mail.deliveries WHERE status = 'sent'")[0]["n"]
        assert proc.stop() == 0
    assert row["status"] == "sent"
    [attempt] = h.attempts(dsn, "login")
    assert attempt["started_at"] - inserted < timedelta(seconds=1)
    # only claims already on their way when it arrived went before it: the backlog was still there
    overtaken = h.query(dsn, "SELECT count(*) AS n FROM mail.attempts WHERE delivery_id LIKE 'news-%%' "
                             "AND started_at > %s", [attempt["started_at"]])[0]["n"]
    assert done_then < backlog * 0.8 and overtaken >= 0
    before_it = h.query(dsn, "SELECT count(*) AS n FROM mail.attempts WHERE delivery_id LIKE 'news-%%' "
                             "AND started_at > %s AND started_at < %s", [inserted, attempt["started_at"]])[0]["n"]
    assert before_it <= 3 * 8  # at most the claims in flight (3 overlapping claims of the 8 workers)


@pytest.mark.slow
def test_three_instances_deliver_every_command_exactly_once(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], redis_client: Any, stream_key: str
) -> None:
    server = smtp_factory(tls="none", auth=None)
    env = smtp_env(service_env, server, MAIL_ATTEMPT_WORKER_CONCURRENCY="8")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    n = 3000
    entries = [h.entry(f"many-{i}", source="authsession" if i % 7 == 0 else "notification",
                       to=[f"user{i}@example.com"]) for i in range(n)]
    repeats = random.Random(7).sample(entries, n // 10)  # 10% repeated commands (same key, same content)
    with ExitStack() as stack:
        procs = [stack.enter_context(ServeProcess(instance(env, name))) for name in ("a", "b", "c")]
        for p in procs:
            p.wait_ready()
        h.xadd(redis_client, stream_key, entries[: n // 2] + repeats + entries[n // 2:])
        rows = h.wait_status(dsn, [e["delivery_id"] for e in entries], timeout=120)
        for p in procs:
            assert p.stop() == 0
    assert len(rows) == n and {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert len(accepted) == n and set(accepted.values()) == {1}
    assert {r["message_id"] for r in rows.values()} == set(accepted)
    atts = h.attempts(dsn)
    assert len(atts) == n and {a["status"] for a in atts} == {"provider_accepted"}
    assert len({a["instance_id"] for a in atts}) >= 2  # the work was shared
