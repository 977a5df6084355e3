"""Fixtures of the operator-tool tests: a running `mailtrio serve` with a token, and the CLI's
environment pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.api.conftest import sql  # noqa: F401  (fixtures shared with the API and foundation tests)
from tests.foundation.conftest import Completed, broken_catalog, run_cli, schemaless_database  # noqa: F401
from tests.support.serve import ServeProcess, base_env

TOKEN = "operator-s3cret-token"


@dataclass
class Service:
    proc: ServeProcess
    addr: str

    def cli(self, *args: str, token: str | None = TOKEN, **env: str) -> Completed:
        """`mailtrio ARGS` with MAIL_INTERNAL_HTTP_ADDR (and the token) of this service."""
        values = {"MAIL_INTERNAL_HTTP_ADDR": self.addr, **env}
        if token is not None:
            values["MAIL_INTERNAL_HTTP_TOKEN"] = token
        return run_cli(list(args), base_env(**values))


@pytest.fixture
def service(service_env: dict[str, str]) -> Iterator[Service]:
    env = dict(service_env, MAIL_INTERNAL_HTTP_TOKEN=TOKEN)
    with ServeProcess(env) as proc:
        proc.wait_ready()
        yield Service(proc, env["MAIL_INTERNAL_HTTP_ADDR"])
        proc.stop()
