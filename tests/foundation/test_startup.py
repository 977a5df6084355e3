"""Startup through the real `mailtrio serve` process (CONTRACT §1, §3; runbook "Startup Checks").

Configuration errors: exit 2, one line naming the variable, before any network I/O. Every other
startup failure: exit 1 with one clear line naming the step, within 15 s, even when a server
hangs. The listener opens only after migrations and the catalog are done.
"""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from mailtrio.store.migrations import GOOSE_LOCK_ID
from tests.conftest import REDIS_ADDR
from tests.foundation.conftest import TcpSink, closed_addr, offline_env, run_cli
from tests.support.serve import ServeProcess

FAILED_STARTUP_LIMIT = 15.0

# (overrides, the variable the one line must name) — the list of configuration mistakes
CONFIG_MISTAKES: list[tuple[dict[str, str], str]] = [
    ({"MAIL_REDIS_MASTER_ADDR": ""}, "MAIL_REDIS_MASTER_ADDR"),
    ({"MAIL_POSTGRES_PRIMARY_DSN": ""}, "MAIL_POSTGRES_PRIMARY_DSN"),
    ({"MAIL_TEMPLATE_DIR": ""}, "MAIL_TEMPLATE_DIR"),
    ({"MAIL_SMTP_MODE": ""}, "MAIL_SMTP_MODE"),
    ({"MAIL_SHUTDOWN_TIMEOUT": "30"}, "MAIL_SHUTDOWN_TIMEOUT"),
    ({"MAIL_RETRY_LADDER": "1m,5x"}, "MAIL_RETRY_LADDER"),
    ({"MAIL_SMTP_MODE": "sendgrid"}, "MAIL_SMTP_MODE"),
    ({"MAIL_SMTP_USERNAME": "mailer"}, "MAIL_SMTP_PASSWORD"),
    ({"MAIL_SMTP_USERNAME": "mailer", "MAIL_SMTP_PASSWORD": "pw", "MAIL_SMTP_TLS": "none"}, "MAIL_SMTP_TLS"),
    ({"MAIL_INTERNAL_HTTP_ADDR": "localhost"}, "MAIL_INTERNAL_HTTP_ADDR"),
    ({"MAIL_SMTP_MODE": "smtp", "MAIL_SMTP_ADDR": "smtp.example.com:25", "MAIL_SMTP_FROM": "nobody"},
     "MAIL_SMTP_FROM"),
    ({"MAIL_TEMPLATE_DIR": "/nonexistent/catalog"}, "MAIL_TEMPLATE_DIR"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
]


@pytest.mark.parametrize(("overrides", "variable"), CONFIG_MISTAKES,
                         ids=[f"{v}-{i}" for i, (_, v) in enumerate(CONFIG_MISTAKES)])
def test_configuration_error_exits_2_with_one_line_before_any_network_io(
    tcp_sink: TcpSink, overrides: dict[str, str], variable: str
) -> None:
    # Redis and PostgreSQL point at a listener that counts connections: there must be none.
    env = offline_env(
        MAIL_REDIS_MASTER_ADDR=tcp_sink.addr,
        MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mailservice@{tcp_sink.addr}/mailtrio",
        MAIL_SMTP_ADDR=tcp_sink.addr,
    )
    env.update(overrides)
    done = run_cli(["serve"], env)
    assert done.code == 2, done
    assert len(done.stderr_lines) == 1, done.stderr
    assert variable in done.stderr_lines[0]
    assert "configuration error" in done.stderr_lines[0]
    assert done.stdout == ""
    assert tcp_sink.count == 0
    assert done.elapsed < 10


def test_the_network_probe_sees_a_valid_configuration_connect(tcp_sink: TcpSink) -> None:
    """Counter-check of the test above: with a valid configuration the process does connect, and
    a Redis master that accepts but never answers still fails startup within 15 s."""
    env = offline_env(MAIL_REDIS_MASTER_ADDR=tcp_sink.addr)
    done = run_cli(["serve"], env)
    assert done.code == 1, done
    assert tcp_sink.count >= 1
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "Redis" in done.stderr_lines[0] and tcp_sink.addr in done.stderr_lines[0]


def test_unreachable_redis_exits_1(database: str) -> None:
    addr = closed_addr()
    done = run_cli(["serve"], offline_env(MAIL_REDIS_MASTER_ADDR=addr, MAIL_POSTGRES_PRIMARY_DSN=database))
    assert done.code == 1, done
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "cannot reach the Redis master" in done.stderr_lines[0] and addr in done.stderr_lines[0]
    assert '"startup failed"' in done.stdout


def test_unreachable_postgres_exits_1() -> None:
    done = run_cli(["serve"], offline_env(MAIL_REDIS_MASTER_ADDR=REDIS_ADDR))
    assert done.code == 1, done
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "cannot connect to PostgreSQL" in done.stderr_lines[0]


def test_hanging_postgres_fails_within_15s(tcp_sink: TcpSink) -> None:
    env = offline_env(MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
                      MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mailservice@{tcp_sink.addr}/mailtrio")
    done = run_cli(["serve"], env)
    assert done.code == 1, done
    assert tcp_sink.count >= 1
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "PostgreSQL" in done.stderr_lines[0]


def test_missing_schema_exits_1_and_says_it_is_provisioned_externally(schemaless_database: str) -> None:
    done = run_cli(["serve"], offline_env(MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
                                          MAIL_POSTGRES_PRIMARY_DSN=schemaless_database))
    assert done.code == 1, done
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    line = done.stderr_lines[0]
    assert "schema 'mail' does not exist" in line and "provisioned externally" in line
    # nothing was created in the database
    with psycopg.connect(schemaless_database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'mail'").fetchone() == (0,)


def test_broken_template_exits_1_naming_file_and_line(
    database: str, broken_catalog: tuple[object, str]
) -> None:
    root, bad_file = broken_catalog
    done = run_cli(["serve"], offline_env(MAIL_REDIS_MASTER_ADDR=REDIS_ADDR, MAIL_POSTGRES_PRIMARY_DSN=database,
                                          MAIL_TEMPLATE_DIR=str(root)))
    assert done.code == 1, done
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "template catalog is invalid" in done.stderr_lines[0]
    assert f"{bad_file}:3:" in done.stderr_lines[0]


def _hold_migration_lock(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (GOOSE_LOCK_ID,))
    return conn


def _refused(addr: str) -> bool:
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_startup_order_and_no_listener_before_migrations_and_catalog(service_env: dict[str, str]) -> None:
    lock = _hold_migration_lock(service_env["MAIL_POSTGRES_PRIMARY_DSN"])
    try:
        with ServeProcess(service_env) as proc:
            proc.wait_for("postgres pool opened")
            time.sleep(1.0)  # migration is now waiting on goose's advisory lock
            assert proc.proc.poll() is None
            assert _refused(proc.http_addr)
            events = proc.events()
            assert "migrations applied" not in events
            assert "internal http listener started" not in events
            lock.execute("SELECT pg_advisory_unlock(%s)", (GOOSE_LOCK_ID,))
            proc.wait_ready()
            status, body = proc.http("GET", "/api/v1/internal/deliveries/does-not-exist")
            assert status == 404 and body["error"]["code"] == "not_found"
            assert proc.stop() == 0
            events = proc.events()
    finally:
        lock.close()
    order = ["starting", "redis master reachable", "postgres pool opened", "migrations applied",
             "template catalog parsed", "internal http listener started"]
    positions = [events.index(e) for e in order]
    assert positions == sorted(positions), events
    # the listener is bound before anything that claims starts
    listener = events.index("internal http listener started")
    for service in ("command consumer started", "scheduler started", "attempt worker pool started",
                    "sql retention worker started"):
        assert listener < events.index(service) < events.index("service ready"), events


def test_a_migration_that_never_gets_its_lock_fails_startup_within_15s(service_env: dict[str, str]) -> None:
    lock = _hold_migration_lock(service_env["MAIL_POSTGRES_PRIMARY_DSN"])
    try:
        done = run_cli(["serve"], service_env)
    finally:
        lock.close()
    assert done.code == 1, done
    assert done.elapsed < FAILED_STARTUP_LIMIT
    assert len(done.stderr_lines) == 1, done.stderr
    assert "migrations" in done.stderr_lines[0]
    assert _refused(service_env["MAIL_INTERNAL_HTTP_ADDR"])
