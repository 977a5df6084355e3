"""One source for each enumeration: `mailtrio.enums` against the schema's CHECK constraints (read
from pg_constraint in a migrated database), the OpenAPI and AsyncAPI documents, and the code that
validates commands; one BCP 47 rule; one backoff with jitter."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from mailtrio import bcp47, commands, enums
from mailtrio.backoff import Backoff
from mailtrio.config import ConfigError
from mailtrio.http import openapi
from mailtrio.http.errors import STATUS_BY_CODE
from mailtrio.providers import base

ASYNCAPI = Path(enums.__file__).parent / "api" / "delivery-commands-asyncapi.yaml"

# (table, column) -> the enumeration its CHECK constraint must list, in the same order
COLUMNS = {
    ("deliveries", "status"): enums.DELIVERY_STATUSES,
    ("deliveries", "source"): enums.SOURCES,
    ("deliveries", "payload_mode"): enums.PAYLOAD_MODES,
    ("attempts", "status"): enums.ATTEMPT_STATUSES,
    ("idempotency_reservations", "source"): enums.SOURCES,
    ("malformed_commands", "failure_code"): enums.FAILURE_CODES,
    ("delivery_events", "event"): enums.EVENT_TYPES,
}


def _check_values(dsn: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """The literals of each single-column CHECK constraint of schema mail, by (table, column)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t.relname, a.attname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = c.conkey[1] "
            "WHERE n.nspname = 'mail' AND c.contype = 'c' AND cardinality(c.conkey) = 1"
        ).fetchall()
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for table, column, definition in rows:
        literals = tuple(re.findall(r"'([^']*)'::text", definition))
        if literals and "ANY" in definition:
            out[(table, column)] = literals
    return out


def test_check_constraints_list_the_enumerations(database: str) -> None:
    found = _check_values(database)
    for key, values in COLUMNS.items():
        assert found.get(key) == values, key
    # no other enumerated column escaped the list
    assert set(found) == set(COLUMNS)
    # a final status change is the event of that name (sql/00008_delivery_events.sql)
    assert set(enums.TERMINAL_STATUSES) <= set(enums.EVENT_TYPES)
    assert set(enums.WAITING_STATUSES) | set(enums.TERMINAL_STATUSES) | {enums.DeliveryStatus.SENDING} == set(
        enums.DELIVERY_STATUSES)


def _enums_in(node: Any) -> list[tuple[str, ...]]:
    out = []
    if isinstance(node, dict):
        if "enum" in node:
            out.append(tuple(node["enum"]))
        for value in node.values():
            out.extend(_enums_in(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_enums_in(value))
    return out


def test_openapi_uses_the_enumerations() -> None:
    found = set(_enums_in(openapi.document("/api/v1/internal", bearer=True)))
    expected = {enums.DELIVERY_STATUSES, enums.ATTEMPT_STATUSES, enums.SOURCES, enums.PAYLOAD_MODES,
                enums.FAILURE_CODES, enums.RECIPIENT_STATUSES,
                tuple(STATUS_BY_CODE)}  # the last: the API's own error codes
    assert found == expected
    outcome = openapi.document("/api/v1/internal", bearer=True)["components"]["schemas"]["RecipientOutcome"]
    assert tuple(outcome["properties"]["status"]["enum"]) == enums.RECIPIENT_STATUSES


def test_asyncapi_and_validation_use_the_enumerations() -> None:
    doc = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    entry = doc["components"]["schemas"]["DeliveryCommandEntry"]["properties"]
    assert tuple(entry["source"]["enum"]) == enums.SOURCES
    assert tuple(entry["payload_mode"]["enum"]) == enums.PAYLOAD_MODES
    event = doc["components"]["schemas"]["DeliveryEventEntry"]["properties"]
    assert tuple(event["event"]["enum"]) == enums.EVENT_TYPES
    # the status after a change that makes an event: any but `sending` (a claim makes none)
    assert tuple(event["status"]["enum"]) == tuple(s for s in enums.DELIVERY_STATUSES
                                                   if s != enums.DeliveryStatus.SENDING)
    assert tuple(event["attempt_status"]["enum"]) == enums.ATTEMPT_STATUSES
    # no other enumeration in the document
    assert len(_enums_in(doc)) == 5
    message = next(m for m in doc["components"]["messages"].values() if "x-failure-codes" in m)
    assert {item["code"] for item in message["x-failure-codes"]} == set(enums.FAILURE_CODES)
    assert tuple(commands.SOURCES) == enums.SOURCES and tuple(commands.FAILURE_CODES) == enums.FAILURE_CODES
    assert base.AttemptStatus is enums.AttemptStatus


@pytest.mark.parametrize(("tag", "ok"), [
    ("en", True), ("fr-CA", True), ("pt-BR", True), ("zh-Hant-TW", True), ("es-419", True),
    ("en_us", False), ("EN-us", False), ("iw", False), ("en-Latn", False), ("xx", False), ("en-", False),
])
def test_one_bcp47_rule(tag: str, ok: bool, tmp_path: Path) -> None:
    from mailtrio.catalog import Catalog, CatalogError
    from mailtrio.config import Settings
    from tests.foundation.conftest import offline_env

    assert bcp47.is_canonical(tag) is ok
    # configuration and the catalog's locale directories say the same
    if ok:
        assert Settings.from_env(offline_env(MAIL_DEFAULT_LOCALE=tag)).default_locale == tag
    else:
        with pytest.raises(ConfigError):
            Settings.from_env(offline_env(MAIL_DEFAULT_LOCALE=tag))
    for locale in {"en", tag}:
        (tmp_path / "t" / locale).mkdir(parents=True, exist_ok=True)
        (tmp_path / "t" / locale / "subject.txt.j2").write_text("Hi")
        (tmp_path / "t" / locale / "body.txt.j2").write_text("Hello")
    if ok:
        assert tag in Catalog.load(tmp_path, "en").locales("t")
    else:
        with pytest.raises(CatalogError) as err:
            Catalog.load(tmp_path, "en")
        assert any("is not canonical BCP 47" in p for p in err.value.problems)


def test_backoff_grows_with_jitter_within_bounds_and_resets() -> None:
    backoff = Backoff(0.2, 5.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    steps = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    for delay, step in zip(delays, steps, strict=True):
        assert step * 0.75 <= delay <= step * 1.25
    assert len({round(d / s, 6) for d, s in zip(delays, steps, strict=True)}) > 1  # jittered, not fixed
    backoff.reset()
    assert 0.15 <= backoff.next() <= 0.25
    assert Backoff(1.0, 4.0, jitter=0).next() == 1.0
    with pytest.raises(ValueError):
        Backoff(0, 1)
    bounded = Backoff(0.1, 2.0, rng=random.Random(3))
    assert bounded.longest == 2.5 and max(bounded.next() for _ in range(200)) <= bounded.longest

