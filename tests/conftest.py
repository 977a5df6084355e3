"""Shared fixtures: real PostgreSQL databases cloned from a migrated template, real Redis keys,
and the environment for a real `mailtrio serve` process. Every test gets its own database,
stream key, consumer group and HTTP port, so tests run in parallel without colliding."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from tests.support import pg
from tests.support.serve import TEMPLATES, base_env, free_port

REDIS_ADDR = os.environ.get("MAILTRIO_TEST_REDIS_ADDR", "127.0.0.1:6379")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"mt_template_{worker}_{os.getpid()}"
    pg.build_template(name)
    yield name
    pg.drop(name)


@pytest.fixture
def database(pg_template: str) -> Iterator[str]:
    """DSN of a fresh, fully migrated database with schema `mail`."""
    name, dsn = pg.clone(pg_template)
    yield dsn
    pg.drop(name)


@pytest.fixture
def empty_database() -> Iterator[str]:
    """DSN of a fresh database with an empty `mail` schema (no migrations applied)."""
    name = f"mt_{uuid.uuid4().hex[:16]}"
    dsn = pg.create_empty(name)
    yield dsn
    pg.drop(name)


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    host, port = REDIS_ADDR.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), decode_responses=False, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def stream_key(redis_client: redis.Redis) -> Iterator[str]:
    key = f"mt:test:{uuid.uuid4().hex}"
    yield key
    redis_client.delete(key, f"{key}:events")


@pytest.fixture
def service_env(database: str, stream_key: str) -> dict[str, str]:
    """Environment for `mailtrio serve` in stub mode on this test's database and stream."""
    return base_env(
        MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
        MAIL_REDIS_COMMAND_STREAM=stream_key,
        # the outcome events of this test's service, beside its commands (deleted with them)
        MAIL_REDIS_EVENT_STREAM=f"{stream_key}:events",
        MAIL_REDIS_CONSUMER_GROUP="mailservice",
        MAIL_POSTGRES_PRIMARY_DSN=database,
        MAIL_POSTGRES_POOL_SIZE="4",
        MAIL_TEMPLATE_DIR=str(TEMPLATES),
        MAIL_SMTP_MODE="stub",
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MAIL_SHUTDOWN_TIMEOUT="10s",
        MAIL_INSTANCE_ID=f"test-{uuid.uuid4().hex[:8]}",
        MAIL_LOG_LEVEL="info",
    )


@pytest.fixture(scope="session")
def metric_reader() -> Iterator[Any]:
    """The in-memory OpenTelemetry metric reader of this test process.

    `telemetry.setup` installs the global providers, which can be done once per process: every
    test that reads metrics in-process shares this reader (compare values before and after).
    """
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanProcessor

    from mailtrio import telemetry

    reader = InMemoryMetricReader()
    # Tests add in-memory span exporters to this provider later: say now that spans are read, so
    # that they are recorded (with no span processor at all, they would carry ids only).
    installed = telemetry.setup("test-process", env={}, extra_readers=[reader],
                                extra_span_processor=lambda tp: tp.add_span_processor(SpanProcessor()))
    yield reader
    installed.shutdown()


@pytest.fixture
async def db(database: str) -> AsyncIterator[Any]:
    """A mailtrio Database (the service's pool) on this test's database, inside an asyncio loop."""
    from mailtrio import bridge
    from mailtrio.store import Database

    async with bridge.open_loop():
        d = Database(database, 6)
        await d.open()
        try:
            yield d
        finally:
            await d.close()
