"""`mailtrio check` against healthy and broken set-ups: real Redis, PostgreSQL and SMTP servers,
a closed port for a Redis that is down, a database without schema, a broken catalog, an SMTP
server that refuses the credentials and one that offers no STARTTLS."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mailtrio.store import migrations
from tests.engine.conftest import SMTP_PASSWORD, SMTP_USER, smtp_env
from tests.foundation.conftest import Completed, closed_addr, run_cli
from tests.support.serve import ServeProcess
from tests.support.smtpserver import SmtpTestServer


@pytest.fixture
def smtp_factory(tmp_path: Path) -> Any:
    servers: list[SmtpTestServer] = []

    def make(**kwargs: Any) -> SmtpTestServer:
        kwargs.setdefault("auth", (SMTP_USER, SMTP_PASSWORD))
        server = SmtpTestServer(tmp_path / f"smtp{len(servers)}", **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def steps(done: Completed) -> dict[str, tuple[str, str]]:
    """{step: (result, detail)} from check's lines `RESULT  STEP  DETAIL`."""
    out = {}
    for line in done.stdout.splitlines():
        result, step, detail = line.split(None, 2)
        out[step] = (result, detail)
    return out


def test_healthy_stub_setup(service_env: dict[str, str]) -> None:
    done = run_cli(["check"], service_env)
    assert done.code == 0, done
    found = steps(done)
    assert list(found) == ["configuration", "redis", "postgres", "migrations", "identity", "templates", "listener",
                           "smtp"]
    assert [r for r, _ in found.values()] == ["ok", "ok", "ok", "ok", "ok", "ok", "ok", "skipped"]
    assert found["identity"][1] == f"MAIL_INSTANCE_ID {service_env['MAIL_INSTANCE_ID']!r} is free"
    assert found["listener"][1] == f"{service_env['MAIL_INTERNAL_HTTP_ADDR']} can be bound"
    assert found["redis"][1] == f"{service_env['MAIL_REDIS_MASTER_ADDR']} answered PING"
    count = len(migrations.load())
    assert found["migrations"][1] == f"{count} of {count} applied"
    assert "MAIL_SMTP_MODE=stub" in found["smtp"][1]
    as_json = json.loads(run_cli(["check", "--json"], service_env).stdout)
    assert [(s["name"], s["result"]) for s in as_json][:2] == [("configuration", "ok"), ("redis", "ok")]


def test_broken_redis_schema_and_catalog(service_env: dict[str, str], schemaless_database: str,
                                         broken_catalog: tuple[Path, str]) -> None:
    root, bad_file = broken_catalog
    done = run_cli(["check"], dict(service_env, MAIL_REDIS_MASTER_ADDR=closed_addr(),
                                   MAIL_POSTGRES_PRIMARY_DSN=schemaless_database, MAIL_TEMPLATE_DIR=str(root)))
    assert done.code == 1, done
    found = steps(done)
    assert found["configuration"][0] == "ok"
    assert found["redis"][0] == "failed" and "cannot reach the Redis master" in found["redis"][1]
    assert found["postgres"][0] == "failed" and "schema 'mail' does not exist" in found["postgres"][1]
    assert found["migrations"] == ("skipped", "needs PostgreSQL")
    assert found["identity"] == ("skipped", "needs PostgreSQL")
    assert found["templates"][0] == "failed" and f"{bad_file}:3" in found["templates"][1]
    assert len(done.stdout.splitlines()) == 8


def test_pending_migrations_are_reported_not_applied(service_env: dict[str, str], empty_database: str) -> None:
    done = run_cli(["check"], dict(service_env, MAIL_POSTGRES_PRIMARY_DSN=empty_database))
    assert done.code == 0, done
    result, detail = steps(done)["migrations"]
    assert result == "ok" and detail.startswith("0 of ") and "pending (applied at start-up): 00001_init.sql" in detail
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('mail.goose_db_version')").fetchone() == (None,)


def test_listener_address(service_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        done = run_cli(["check"], dict(service_env, MAIL_INTERNAL_HTTP_ADDR=addr, MAIL_REDIS_MASTER_ADDR=closed_addr()))
        assert steps(done)["listener"] == ("ok", f"{addr} is in use now (by a running instance?): serve needs it free")
    # an address of no interface of this host cannot be bound: failed
    done = run_cli(["check"], dict(service_env, MAIL_INTERNAL_HTTP_ADDR="192.0.2.1:8080", MAIL_INTERNAL_HTTP_TOKEN="t",
                                   MAIL_REDIS_MASTER_ADDR=closed_addr()))
    result, detail = steps(done)["listener"]
    assert result == "failed" and "Cannot assign requested address" in detail, detail


def test_a_running_instance_is_reported_not_failed(service_env: dict[str, str]) -> None:
    """The deploy check while the instance it replaces runs: its identity lock and its listener are
    reported as held, and the check still passes; check never takes the lock itself."""
    instance = service_env["MAIL_INSTANCE_ID"]
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        done = run_cli(["check"], service_env)
        assert done.code == 0, done
        result, detail = steps(done)["identity"]
        assert result == "ok", detail
        assert detail.startswith(f"MAIL_INSTANCE_ID {instance!r} is held by a live process now (PostgreSQL "
                                 "backend pid "), detail
        assert f"application_name 'mailtrio:{instance}'" in detail and "serve needs it free" in detail
        assert steps(done)["listener"][1].endswith("is in use now (by a running instance?): serve needs it free")
        assert proc.proc.poll() is None  # the service kept its identity and runs on
        assert proc.stop() == 0
    assert steps(run_cli(["check"], service_env))["identity"] == ("ok", f"MAIL_INSTANCE_ID {instance!r} is free")


def test_configuration_error(service_env: dict[str, str]) -> None:
    done = run_cli(["check"], dict(service_env, MAIL_SMTP_MODE="carrier-pigeon"))
    assert done.code == 1, done
    found = steps(done)
    assert found["configuration"][0] == "failed" and "MAIL_SMTP_MODE" in found["configuration"][1]
    assert {r for r, _ in list(found.values())[1:]} == {"skipped"}


def test_smtp_probe(service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer]) -> None:
    good = smtp_factory()
    done = run_cli(["check"], smtp_env(service_env, good))
    assert done.code == 0, done
    assert steps(done)["smtp"] == ("ok", f"{good.addr}: connect, EHLO, STARTTLS, AUTH, QUIT ok (nothing sent)")
    assert good.accepted() == [] and good.connections() == 1

    refused = run_cli(["check"], smtp_env(service_env, good, MAIL_SMTP_PASSWORD="wrong-password"))
    assert refused.code == 1, refused
    result, detail = steps(refused)["smtp"]
    assert result == "failed" and detail.startswith("auth: authentication failed: 535"), detail
    assert "wrong-password" not in refused.stdout

    plain = smtp_factory(tls="none", auth=None)
    no_tls = run_cli(["check"], smtp_env(service_env, plain, MAIL_SMTP_TLS="starttls"))
    assert no_tls.code == 1, no_tls
    assert steps(no_tls)["smtp"] == ("failed", "tls: the server does not offer STARTTLS (MAIL_SMTP_TLS=starttls)")

    implicit = smtp_factory(tls="tls")
    done = run_cli(["check"], smtp_env(service_env, implicit))
    assert steps(done)["smtp"] == ("ok", f"{implicit.addr}: connect, TLS, EHLO, AUTH, QUIT ok (nothing sent)"), done

    down = run_cli(["check"], smtp_env(service_env, good, MAIL_SMTP_ADDR=closed_addr()))
    assert down.code == 1 and steps(down)["smtp"][1].startswith("connect: "), down
