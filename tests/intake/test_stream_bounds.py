"""The stream stays bounded and re-reading it is harmless (#12.6), and one poison entry never
blocks the entries beside it (#12.7): real Redis and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import redis
import trio

from mailtrio.store import intake as store_intake
from tests.intake.conftest import Tables, drain, entry, eventually, opened, settings_for


def _ms_ago(seconds: float) -> int:
    return int((time.time() - seconds) * 1000)


async def test_an_entry_older_than_the_ttl_is_quarantined_as_stale(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    settings = settings_for(service_env, MAIL_IDEMPOTENCY_TTL="1m")
    old_id = f"{_ms_ago(120)}-0"
    redis_client.xadd(stream_key, entry(delivery_id="d-stale"), id=old_id)  # type: ignore[arg-type]
    redis_client.xadd(stream_key, entry(delivery_id="d-fresh"))  # type: ignore[arg-type]
    async with opened(settings) as w:
        await drain(w.consumer)
    assert set(tables.deliveries()) == {"d-fresh"}
    row = tables.malformed()[old_id]
    assert row["failure_code"] == "stale_command"
    assert row["delivery_id"] == "d-stale"
    assert "MAIL_IDEMPOTENCY_TTL" in row["failure_detail"]


async def test_trim_removes_only_old_entries_every_group_acknowledged(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, xadd: Any
) -> None:
    settings = settings_for(service_env, MAIL_IDEMPOTENCY_TTL="2s")
    async with opened(settings) as w:
        for i in range(3):
            xadd(entry(delivery_id=f"d-{i}"))
        await drain(w.consumer)
        # one more entry read by another consumer and never acknowledged (pending), one unread
        pending_id = xadd(entry(delivery_id="d-pending"))
        redis_client.xreadgroup("mailservice", "other", {stream_key: ">"}, count=1)
        await trio.sleep(2.2)
        late_id = xadd(entry(delivery_id="d-late"))
        deleted, minid = await w.stream.trim(2.0)
        assert deleted == 3
        assert minid == pending_id
        ids = [i.decode() for i, _ in redis_client.xrange(stream_key)]
        assert ids == [pending_id, late_id]
        # a second group that has read nothing keeps everything
        redis_client.xgroup_create(stream_key, "late-group", id="0")
        redis_client.xack(stream_key, "mailservice", pending_id)
        assert (await w.stream.trim(0.0))[0] == 0
        redis_client.xgroup_destroy(stream_key, "late-group")
        # acknowledged, but younger than the TTL: kept
        assert (await w.stream.trim(60.0))[0] == 0
        assert redis_client.xlen(stream_key) == 2


async def test_the_consumer_trims_on_its_own(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, xadd: Any
) -> None:
    settings = settings_for(service_env, MAIL_IDEMPOTENCY_TTL="1s")
    async with opened(settings) as w:
        for i in range(5):
            xadd(entry(delivery_id=f"t-{i}"))
        await drain(w.consumer)
        await trio.sleep(1.2)
        w.consumer._next_trim = 0.0
        await drain(w.consumer)
    assert redis_client.xlen(stream_key) == 0


async def test_a_poison_entry_never_blocks_its_neighbours_for_more_than_one_retry(
    service_env: dict[str, str], xadd: Any, tables: Tables, redis_client: redis.Redis, stream_key: str,
    monkeypatch: Any,
) -> None:
    """A commit that keeps failing for one entry (not a data error, not a lost connection): the
    entries read with it are committed after one retry, the poison entry stays pending, parked
    with its own backoff, and is tried again."""
    real = store_intake.commit_batch
    tries = {"n": 0}

    async def commit_batch(conn: Any, commands: Any, malformed: Any, **kw: Any) -> Any:
        if any(c.delivery_id == "poison" for c in commands):
            tries["n"] += 1
            raise RuntimeError("this entry breaks the commit")
        return await real(conn, commands, malformed, **kw)

    monkeypatch.setattr(store_intake, "commit_batch", commit_batch)
    ids = [xadd(entry(delivery_id=name)) for name in ("n-1", "n-2", "poison", "n-3", "n-4")]
    async with opened(settings_for(service_env)) as w, trio.open_nursery() as nursery:
        await nursery.start(w.consumer.run)
        await eventually(lambda: {"n-1", "n-2", "n-3", "n-4"} <= set(tables.deliveries()), within=30,
                         what="the neighbours of the poison entry are committed")
        assert ids[2] in w.consumer.parked
        later = xadd(entry(delivery_id="n-5"))
        await eventually(lambda: "n-5" in tables.deliveries(), within=30, what="new entries flow")
        # parked, then tried again after its backoff
        await eventually(lambda: tries["n"] >= 3, within=30, what="the poison entry is retried")
        nursery.cancel_scope.cancel()
    pending = redis_client.xpending(stream_key, "mailservice")
    assert pending["pending"] == 1 and pending["min"].decode() == ids[2]
    assert later not in tables.malformed()
    assert "poison" not in tables.deliveries()
