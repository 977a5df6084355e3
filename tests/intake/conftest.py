"""Fixtures and helpers for the intake tests: well-formed entries, a consumer wired to this test's
database and stream, and synchronous reads of the outcome tables."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis
from psycopg.rows import dict_row

from mailtrio import bridge
from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.intake import Consumer
from mailtrio.store import Database
from mailtrio.stream import Stream


def payload(**overrides: Any) -> dict[str, Any]:
    """A well-formed template payload for the sample catalog's `login-code`."""
    body: dict[str, Any] = {
        "template_id": "login-code",
        "to": [{"email": "alice@example.com", "name": "Alice"}],
        "variables": {"code": "123456"},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _DROP}


def rendered_payload(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "to": ["bob@example.com"],
        "subject": "Hello",
        "text": "Plain body",
        "html": "<p>HTML body</p>",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _DROP}


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


# use as a value in entry()/payload() overrides to remove a field
_DROP: Any = _Drop()
DROP = _DROP


def entry(*, payload_obj: Any = None, **overrides: Any) -> dict[str, str]:
    """A well-formed stream entry (all strings), with overrides; DROP removes a field."""
    delivery_id = overrides.pop("delivery_id", None) or f"d-{uuid.uuid4().hex[:16]}"
    body = payload() if payload_obj is None else payload_obj
    fields: dict[str, Any] = {
        "delivery_id": delivery_id,
        "source": "authsession",
        "idempotency_key": f"key-{delivery_id}",
        "payload_mode": "template",
        "locale": "en",
        "payload": body if isinstance(body, (str, bytes)) else json.dumps(body),
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not _DROP}


def as_bytes(fields: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {
        (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
        for k, v in fields.items()
    }


def settings_for(env: Mapping[str, str], **overrides: str) -> Settings:
    return Settings.from_env({**env, **overrides})


@dataclass
class Wiring:
    settings: Settings
    consumer: Consumer
    stream: Stream
    db: Database


@asynccontextmanager
async def opened(settings: Settings, *, loop: bool = True) -> AsyncIterator[Wiring]:
    """A consumer on its own pool and Redis client (inside a trio-asyncio loop unless `loop=False`,
    for a second consumer sharing the caller's loop)."""
    if loop:
        async with bridge.open_loop(), opened(settings, loop=False) as wiring:
            yield wiring
        return
    db = Database(settings.postgres_dsn, 4)
    await db.open()
    stream = Stream(settings)
    catalog = Catalog.load(settings.template_dir, settings.default_locale)
    try:
        yield Wiring(settings, Consumer(settings, stream, db, catalog), stream, db)
    finally:
        await stream.close()
        await db.close()


async def drain(consumer: Consumer, *, block: float = 0.05, limit: int = 200) -> list[Any]:
    """run_once until a read of new entries comes back empty (bounded); returns every count."""
    out = []
    for _ in range(limit):
        counts = await consumer.run_once(block=block)
        out.append(counts)
        if counts.origin == "new" and counts.read == 0:
            return out
    raise AssertionError(f"the stream did not drain in {limit} steps")


async def eventually(predicate: Any, *, within: float = 20.0, step: float = 0.05, what: str = "") -> None:
    """Poll `predicate()` until true; fail after `within` seconds."""
    import trio

    for _ in range(int(within / step) + 1):
        if predicate():
            return
        await trio.sleep(step)
    raise AssertionError(f"condition not met within {within}s: {what or predicate}")


class Tables:
    """Synchronous reads of the outcome tables of one test database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def one(self, sql: str, params: Any = None) -> Any:
        rows = self.rows(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def deliveries(self) -> dict[str, dict[str, Any]]:
        return {r["delivery_id"]: r for r in self.rows("SELECT * FROM mail.deliveries")}

    def malformed(self) -> dict[str, dict[str, Any]]:
        return {r["stream_entry_id"]: r for r in self.rows("SELECT * FROM mail.malformed_commands")}

    def count(self, table: str) -> int:
        return int(self.one(f"SELECT count(*) FROM mail.{table}"))


@pytest.fixture
def tables(database: str) -> Tables:
    return Tables(database)


@pytest.fixture
def intake_settings(service_env: dict[str, str]) -> Settings:
    return settings_for(service_env)


@pytest.fixture
def xadd(redis_client: redis.Redis, stream_key: str) -> Iterator[Any]:
    def _add(fields: Mapping[str, Any]) -> str:
        entry_id = redis_client.xadd(stream_key, dict(fields))  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    yield _add
