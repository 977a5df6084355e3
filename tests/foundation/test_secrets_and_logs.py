"""No secret ever reaches a log line or an error (CONTRACT §2), and the log formats (§8)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
import redis

from tests.foundation.conftest import closed_addr, offline_env, run_cli
from tests.support.serve import ServeProcess, free_port

REDIS_SECRET = "redis-Secret-7f3a9c"
PG_SECRET = "pg-Secret-1d5e8b"
SMTP_SECRET = "smtp-Secret-4b2c6d"
HTTP_SECRET = "http-Secret-9e0f1a"
SECRETS = (REDIS_SECRET, PG_SECRET, SMTP_SECRET, HTTP_SECRET)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
            assert urllib.parse.quote(secret) not in text


@pytest.fixture
def protected_redis() -> Iterator[str]:
    """A private redis-server that requires a password (MAIL_REDIS_PASSWORD must be used)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/setup installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", REDIS_SECRET, "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_SECRET, socket_timeout=2)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def _with_password(dsn: str, password: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["password"] = password
    return psycopg.conninfo.make_conninfo(**params)


def test_no_secret_in_any_log_line_of_a_full_run(database: str, protected_redis: str, stream_key: str) -> None:
    env = offline_env(
        MAIL_REDIS_MASTER_ADDR=protected_redis,
        MAIL_REDIS_PASSWORD=REDIS_SECRET,
        MAIL_REDIS_COMMAND_STREAM=stream_key,
        MAIL_POSTGRES_PRIMARY_DSN=_with_password(database, PG_SECRET),
        MAIL_POSTGRES_POOL_SIZE="4",
        MAIL_SMTP_USERNAME="mailer",
        MAIL_SMTP_PASSWORD=SMTP_SECRET,
        MAIL_INTERNAL_HTTP_TOKEN=HTTP_SECRET,
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MAIL_LOG_LEVEL="debug",
        MAIL_SHUTDOWN_TIMEOUT="10s",
    )
    with ServeProcess(env) as proc:
        proc.wait_ready()
        path = "/api/v1/internal/deliveries/does-not-exist"
        assert proc.http("GET", path)[0] == 401
        assert proc.http("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = proc.http("GET", path, headers={"Authorization": f"Bearer {HTTP_SECRET}"})
        assert status == 404 and body["error"]["code"] == "not_found"
        proc.wait_for("internal http request", count=3)
        assert proc.stop() == 0
    assert proc.events()[-1] == "shutdown complete"
    assert_no_secret("\n".join(proc.raw), proc.stderr)


def test_no_secret_in_startup_errors(database: str, protected_redis: str) -> None:
    wrong_redis = run_cli(["serve"], offline_env(MAIL_REDIS_MASTER_ADDR=protected_redis,
                                                 MAIL_REDIS_PASSWORD=SMTP_SECRET, MAIL_POSTGRES_PRIMARY_DSN=database))
    assert wrong_redis.code == 1 and "Redis" in wrong_redis.stderr, wrong_redis
    no_pg = run_cli(["serve"], offline_env(
        MAIL_REDIS_MASTER_ADDR=protected_redis, MAIL_REDIS_PASSWORD=REDIS_SECRET,
        MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mailservice:{PG_SECRET}@{closed_addr()}/mailtrio",
        MAIL_INTERNAL_HTTP_TOKEN=HTTP_SECRET, MAIL_SMTP_USERNAME="u", MAIL_SMTP_PASSWORD=SMTP_SECRET))
    assert no_pg.code == 1 and "PostgreSQL" in no_pg.stderr, no_pg
    bad_dsn = run_cli(["serve"], offline_env(MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://u:{PG_SECRET}@[h/db"))
    assert bad_dsn.code == 2 and "MAIL_POSTGRES_PRIMARY_DSN" in bad_dsn.stderr, bad_dsn
    bad_kv = run_cli(["migrate"], offline_env(MAIL_POSTGRES_PRIMARY_DSN=f"host=h password={PG_SECRET} port"))
    assert bad_kv.code == 2 and "MAIL_POSTGRES_PRIMARY_DSN" in bad_kv.stderr, bad_kv
    migrate = run_cli(["migrate"], offline_env(
        MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://mailservice:{PG_SECRET}@{closed_addr()}/mailtrio"))
    assert migrate.code == 1, migrate
    tls_none = run_cli(["serve"], offline_env(MAIL_SMTP_USERNAME="u", MAIL_SMTP_PASSWORD=SMTP_SECRET,
                                              MAIL_SMTP_TLS="none"))
    assert tls_none.code == 2, tls_none
    for done in (wrong_redis, no_pg, bad_dsn, bad_kv, migrate, tls_none):
        assert_no_secret(done.stdout, done.stderr)


def test_json_log_lines_have_the_contract_keys(service_env: dict[str, str]) -> None:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        assert proc.stop() == 0
    assert proc.raw and len(proc.raw) == len(proc.lines)  # every stdout line is one JSON object
    for line in proc.lines:
        assert {"event", "level", "timestamp"} <= set(line), line
        assert line["timestamp"].endswith("Z")
    in_span = [line for line in proc.lines if "otel_trace_id" in line]
    for line in in_span:
        assert len(line["otel_trace_id"]) == 32 and len(line["otel_span_id"]) == 16


def test_console_log_format(service_env: dict[str, str]) -> None:
    env = {**service_env, "MAIL_LOG_FORMAT": "console"}
    with ServeProcess(env) as proc:
        deadline = time.monotonic() + 20
        while not any("internal http listener started" in line for line in proc.raw):
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.stderr
            time.sleep(0.1)
        proc.signal()
        assert proc.wait(30) == 0
    assert proc.lines == []  # nothing is JSON
    assert any("shutdown complete" in line for line in proc.raw)
    for line in proc.raw:
        if line.strip():
            with pytest.raises(ValueError):
                json.loads(line)
