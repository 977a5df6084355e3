"""Fixtures of the engine tests: a real SMTP server process and `mailtrio serve` in smtp mode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.helpers import SMTP_FROM
from tests.support.smtpserver import SmtpTestServer

SMTP_USER = "mailtrio"
SMTP_PASSWORD = "s3cret-pa55word"


@pytest.fixture
def smtp_factory(tmp_path: Path) -> Iterator[Callable[..., SmtpTestServer]]:
    servers: list[SmtpTestServer] = []

    def make(**kwargs: Any) -> SmtpTestServer:
        kwargs.setdefault("auth", (SMTP_USER, SMTP_PASSWORD))
        server = SmtpTestServer(tmp_path / f"smtp{len(servers)}", **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def smtp_env(service_env: dict[str, str], server: SmtpTestServer, **overrides: str) -> dict[str, str]:
    """`service_env` switched to smtp mode against `server` (STARTTLS, AUTH, its CA)."""
    env = dict(service_env)
    env.update(
        MAIL_SMTP_MODE="smtp",
        MAIL_SMTP_ADDR=server.addr,
        MAIL_SMTP_FROM=SMTP_FROM,
        MAIL_SMTP_TLS=server.config["tls"],
        MAIL_SMTP_TIMEOUT="3s",
        MAIL_RETRY_LADDER="100ms,200ms",
        MAIL_ATTEMPT_WORKER_CONCURRENCY="4",
    )
    if server.certs is not None:
        env["MAIL_SMTP_CA_FILE"] = str(server.ca_file)
    if server.config.get("auth"):
        env["MAIL_SMTP_USERNAME"] = server.config["auth"]["user"]
        env["MAIL_SMTP_PASSWORD"] = server.config["auth"]["password"]
    env.update(overrides)
    return env
