"""Instances dying and stopping mid-run: nothing lost, and every duplicate at the server is an
attempt recorded `interrupted`."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime, timedelta

import pytest

from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.engine.test_e2e_instances import instance
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer


@pytest.mark.slow
def test_sigkill_of_one_instance_loses_nothing(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    server = smtp_factory(tls="none", auth=None)
    # lease = MAIL_SMTP_TIMEOUT + 15 s: the dead instance's claims come back after ~16 s
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="1s", MAIL_ATTEMPT_WORKER_CONCURRENCY="8")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    n = 1200
    ids = h.insert(dsn, [h.delivery(f"k-{i}", to=[f"user{i}@example.com"]) for i in range(n)])
    with ExitStack() as stack:
        victim = stack.enter_context(ServeProcess(instance(env, "victim")))
        survivor = stack.enter_context(ServeProcess(instance(env, "survivor")))
        victim.wait_ready()
        survivor.wait_ready()
        server.wait_accepted(200)
        victim.proc.send_signal(signal.SIGKILL)
        victim.wait(10)
        rows = h.wait_status(dsn, ids, timeout=60)
        rescue = survivor.find("expired leases rescued; deliveries back on the schedule")
        assert survivor.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert {r["message_id"] for r in rows.values()} == set(accepted)  # nothing lost
    interrupted = {a["delivery_id"] for a in h.attempts(dsn) if a["status"] == "interrupted"}
    duplicated = {did for did, r in rows.items() if accepted[r["message_id"]] > 1}
    assert duplicated <= interrupted  # every duplicate is an attempt recorded interrupted
    assert all(a["instance_id"] == f"{env['MAIL_INSTANCE_ID']}-victim"
               for a in h.attempts(dsn) if a["status"] == "interrupted")
    if interrupted:
        assert rescue and sum(line["count"] for line in rescue) == len(interrupted)
    assert max(accepted.values()) <= 2


def test_sigterm_mid_run_exits_0_in_time_and_loses_nothing(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    # A few recipients stall once for longer than the whole shutdown: those attempts are still
    # running at the deadline, are cancelled, recorded interrupted and put back at once.
    server = smtp_factory(tls="none", auth=None, rules=[{"match": r"^stall", "action": "stall", "stall_s": 30,
                                                          "times": 1}])
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="20s", MAIL_SHUTDOWN_TIMEOUT="3s",
                   MAIL_ATTEMPT_WORKER_CONCURRENCY="8")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    n = 600
    ids = h.insert(dsn, [h.delivery(f"t-{i}", to=[f"{'stall' if i < 3 else 'user'}{i}@example.com"])
                         for i in range(n)])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        server.wait_accepted(100)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        took = time.monotonic() - started
        assert proc.events()[-1] == "shutdown complete"
    assert took < 3.0 + 1.5, took  # inside MAIL_SHUTDOWN_TIMEOUT (plus process exit)
    after_stop = h.deliveries(dsn)
    assert not [r for r in after_stop.values() if r["status"] == "sending"]  # nothing waits for a lease
    interrupted = [a for a in h.attempts(dsn) if a["status"] == "interrupted"]
    # the first three were claimed first and stalled past the deadline
    assert {a["delivery_id"] for a in interrupted} == {"t-0", "t-1", "t-2"}
    for a in interrupted:
        assert after_stop[a["delivery_id"]]["status"] in ("rendered", "sent")
    assert proc.find("attempt worker pool stopped at the shutdown deadline; running attempts were cancelled")
    with ServeProcess(instance(env, "again")) as again:
        again.wait_ready()
        rows = h.wait_status(dsn, ids, timeout=60)
        assert again.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert {r["message_id"] for r in rows.values()} == set(accepted)
    assert set(accepted.values()) == {1}  # stalled attempts never completed: no duplicate at all


def test_database_connections_killed_mid_run(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    """Every PostgreSQL backend of the service is terminated twice while it sends: the scheduler,
    the recorder and the LISTEN connection recover by themselves and nothing is sent twice."""
    server = smtp_factory(tls="none", auth=None)
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="1s", MAIL_ATTEMPT_WORKER_CONCURRENCY="8")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"p-{i}", to=[f"user{i}@example.com"]) for i in range(600)])
    dbname = dsn.rsplit("/", 1)[1] if "dbname=" not in dsn else dsn.split("dbname=")[1].split()[0]
    kill = ("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE 'mailtrio:%%'")
    with ServeProcess(env) as proc:
        proc.wait_ready()
        for target in (100, 300):
            server.wait_accepted(target)
            assert h.query(dsn, kill, [dbname])[0]["n"] >= 1
        rows = h.wait_status(dsn, ids, timeout=60)
        assert proc.stop() == 0
        assert proc.find("schedule listener reconnected")
    assert {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert {r["message_id"] for r in rows.values()} == set(accepted)
    assert set(accepted.values()) == {1}


def test_restart_under_the_same_instance_id_rescues_its_leases_at_once(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]
) -> None:
    """Killed mid-send and started again with the same MAIL_INSTANCE_ID: its own stale leases go
    back on the schedule before its first claim, long before they would have expired."""
    server = smtp_factory(tls="none", auth=None, rules=[{"match": r"^slow", "action": "stall", "stall_s": 3}])
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="60s", MAIL_ATTEMPT_WORKER_CONCURRENCY="4")
    dsn = env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"s-{i}", to=[f"slow{i}@example.com"]) for i in range(4)])
    with ServeProcess(env) as first:
        first.wait_ready()
        h.wait_status(dsn, ids, statuses=("sending",), timeout=15)
        first.proc.send_signal(signal.SIGKILL)
        first.wait(10)
    with ServeProcess(env) as again:
        again.wait_ready()
        rows = h.wait_status(dsn, ids, timeout=30)
        rescued = again.find("leases of a previous run of this instance rescued; deliveries back on the schedule")
        assert again.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert rescued and rescued[0]["count"] == 4
    for did in ids:
        first_attempt, second = h.attempts(dsn, did)
        assert first_attempt["status"] == "interrupted" and second["status"] == "provider_accepted"
        # rescued before the 75 s lease (60 s timeout + 15 s) could have expired
        expires = datetime.fromisoformat(first_attempt["details"]["lease_expires_at"])
        assert first_attempt["finished_at"] < expires - timedelta(seconds=30)
