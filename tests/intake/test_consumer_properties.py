"""Hypothesis through the real consumer: arbitrary, adversarial and repeated entries on a real
stream and database. Every entry ends as exactly one delivery, duplicate or quarantine row, every
entry is acknowledged, and the consumer keeps going."""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.intake.conftest import Tables, drain, opened, payload, settings_for
from tests.intake.test_commands import entries as adversarial_entries


@st.composite
def well_formed(draw: st.DrawFn, run: str) -> dict[bytes, bytes]:
    """Well-formed commands over a tiny space of keys, ids and contents: repeats, conflicts."""
    n = draw(st.integers(0, 3))
    body = payload(variables={"code": draw(st.sampled_from(["1", "2"]))})
    fields = {
        "delivery_id": f"{run}-d{draw(st.integers(0, 3))}",
        "source": draw(st.sampled_from(["authsession", "notification"])),
        "idempotency_key": f"{run}-k{n}",
        "payload_mode": "template",
        "locale": draw(st.sampled_from(["en", "fr"])),
        "payload": json.dumps(body),
    }
    if draw(st.booleans()):
        fields["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return {k.encode(): v.encode() for k, v in fields.items()}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_every_entry_gets_exactly_one_outcome(
    data: st.DataObject, service_env: dict[str, str], redis_client: redis.Redis, tables: Tables
) -> None:
    run = uuid.uuid4().hex[:8]
    key = f"mt:test:{run}"
    batch = data.draw(st.lists(st.one_of(well_formed(run), adversarial_entries()), min_size=1, max_size=25))
    try:
        ids = []
        for fields in batch:
            # Redis needs at least one field in an entry
            ids.append(redis_client.xadd(key, fields or {b"x": b""}).decode())  # type: ignore[arg-type]
        settings_ = settings_for(service_env, MAIL_REDIS_COMMAND_STREAM=key)

        async def consume() -> list[Any]:
            async with opened(settings_) as w:
                return await drain(w.consumer)

        counts = trio.run(consume)
        got = {k: sum(getattr(c, k) for c in counts) for k in
               ("read", "accepted", "duplicates", "rejected", "already_recorded", "vanished", "acked")}
        assert got["read"] == got["acked"] == len(batch)
        assert got["accepted"] + got["duplicates"] + got["rejected"] == len(batch), got
        assert got["already_recorded"] == got["vanished"] == 0
        delivered = {r["stream_entry_id"] for r in tables.rows(
            "SELECT stream_entry_id FROM mail.deliveries WHERE stream_entry_id = ANY(%s)", (ids,))}
        quarantined = {r["stream_entry_id"] for r in tables.rows(
            "SELECT stream_entry_id FROM mail.malformed_commands WHERE stream_entry_id = ANY(%s)", (ids,))}
        assert len(delivered) == got["accepted"]
        assert len(quarantined) == got["rejected"]
        assert not delivered & quarantined
        assert int(redis_client.xpending(key, "mailservice")["pending"]) == 0
    finally:
        redis_client.delete(key)
