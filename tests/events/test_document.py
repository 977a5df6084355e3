"""The event channel of the AsyncAPI document agrees with the configuration, the schema and itself."""

from __future__ import annotations

from pathlib import Path

from mailtrio.config import VARIABLES
from tests.events.schema import DOC, assert_documented, event_validator

MIGRATION = Path(__file__).resolve().parents[2] / "sql" / "00008_delivery_events.sql"


def test_channel_operation_and_default_stream() -> None:
    assert DOC["channels"]["deliveryEvents"]["address"] == VARIABLES["MAIL_REDIS_EVENT_STREAM"][1]
    assert DOC["operations"]["publishDeliveryEvents"]["action"] == "send"


def test_examples_match_the_schema() -> None:
    examples = DOC["components"]["messages"]["DeliveryEvent"]["examples"]
    assert {e["payload"]["event"] for e in examples} >= {"accepted", "deferred", "sent", "rejected"}
    for example in examples:
        assert_documented(example["payload"])


def test_event_types_match_the_outbox_constraint() -> None:
    documented = DOC["components"]["schemas"]["DeliveryEventEntry"]["properties"]["event"]["enum"]
    sql = MIGRATION.read_text(encoding="utf-8")
    for name in documented:
        assert f"'{name}'" in sql
    good = {"event_id": "3f6c1f0e-5d0a-4c1e-9f3a-2b7c6d8e9a01", "event": "sent",
            "occurred_at": "2026-11-29T18:05:00.120Z"}
    assert event_validator().is_valid(good)
    assert not event_validator().is_valid({**good, "event": "bounced"})
    assert not event_validator().is_valid({**good, "unknown_field": "x"})
