"""Metrics of CONTRACT §8: names, attributes and values, in-process and from a real service."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row

from mailtrio import bridge, telemetry
from mailtrio.store import Database
from tests.api.conftest import delivery_row, insert_deliveries
from tests.support.serve import ServeProcess

CONTRACT_METRICS = {
    "mail.attempt_schedule.depth",
    "mail.attempt_schedule.oldest_age_ms",
    "mail.delivery.dead_letters",
    "mail.delivery.suppressed",
    "mail.stream_commands.malformed",
    "mail.provider.send.duration_ms",
    "mail.attempt.outcomes",
}


def collect(reader: Any) -> dict[str, Any]:
    """Metric name -> its data (points with attributes), from one collection of the reader."""
    data = reader.get_metrics_data()
    out: dict[str, Any] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = metric.data
    return out


def point(metrics: dict[str, Any], name: str, **attributes: str) -> Any:
    matches = [p for p in metrics[name].data_points if dict(p.attributes or {}) == attributes]
    assert len(matches) == 1, (name, attributes, metrics[name].data_points)
    return matches[0]


def counter_value(reader: Any, name: str, **attributes: str) -> float:
    metrics = collect(reader)
    if name not in metrics:
        return 0
    found = [p for p in metrics[name].data_points if dict(p.attributes or {}) == attributes]
    return found[0].value if found else 0


def _seed_schedule(dsn: str) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        insert_deliveries(conn, [
            delivery_row(status="queued", schedule_entered_at=now - timedelta(minutes=10)),
            delivery_row(status="rendered", schedule_entered_at=now - timedelta(minutes=2)),
            delivery_row(status="queued", schedule_entered_at=now + timedelta(hours=5)),  # send_at later
            delivery_row(status="sent"),
            delivery_row(status="sending"),
            delivery_row(status="failed", schedule_entered_at=now - timedelta(days=3)),
        ])


async def test_schedule_gauges_read_the_refreshed_snapshot(database: str, metric_reader: Any) -> None:
    _seed_schedule(database)
    async with bridge.open_loop():
        db = Database(database, 2)
        await db.open()
        try:
            snapshot = await telemetry.ScheduleMonitor(db).refresh()
        finally:
            await db.close()
    assert snapshot.depth == 3
    assert 600_000 <= snapshot.oldest_age_ms < 660_000

    # the pool is closed: an export only reads the snapshot, it never queries the database
    metrics = collect(metric_reader)
    assert point(metrics, "mail.attempt_schedule.depth").value == 3
    oldest = point(metrics, "mail.attempt_schedule.oldest_age_ms").value
    assert oldest == snapshot.oldest_age_ms


async def test_schedule_monitor_refreshes_until_cancelled(database: str, metric_reader: Any) -> None:
    async with bridge.open_loop():
        db = Database(database, 2)
        await db.open()
        try:
            monitor = telemetry.ScheduleMonitor(db, interval=0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                assert await _snapshot_reaches(0)
                await trio.to_thread.run_sync(_seed_schedule, database)
                assert await _snapshot_reaches(3)
                nursery.cancel_scope.cancel()
        finally:
            await db.close()
    assert point(collect(metric_reader), "mail.attempt_schedule.depth").value == 3


async def _snapshot_reaches(depth: int) -> bool:
    for _ in range(500):
        if telemetry.schedule_snapshot.depth == depth:
            return True
        await trio.sleep(0.02)
    return False


def test_contract_counters_and_histogram_names_and_attributes(metric_reader: Any) -> None:
    before = {
        "dead": counter_value(metric_reader, "mail.delivery.dead_letters"),
        "suppressed": counter_value(metric_reader, "mail.delivery.suppressed"),
        "malformed": counter_value(metric_reader, "mail.stream_commands.malformed", failure_code="unsafe_header"),
        "timed_out": counter_value(metric_reader, "mail.attempt.outcomes", status="timed_out"),
    }
    telemetry.dead_letters.add(1)
    telemetry.suppressed.add(2)
    telemetry.malformed_commands.add(1, {"failure_code": "unsafe_header"})
    telemetry.attempt_outcomes.add(3, {"status": "timed_out"})
    telemetry.send_duration_ms.record(42.0)

    metrics = collect(metric_reader)
    assert set(metrics) >= CONTRACT_METRICS
    assert point(metrics, "mail.delivery.dead_letters").value == before["dead"] + 1
    assert point(metrics, "mail.delivery.suppressed").value == before["suppressed"] + 2
    assert point(metrics, "mail.stream_commands.malformed", failure_code="unsafe_header").value == \
        before["malformed"] + 1
    assert point(metrics, "mail.attempt.outcomes", status="timed_out").value == before["timed_out"] + 3
    histogram = point(metrics, "mail.provider.send.duration_ms")
    assert histogram.count >= 1 and histogram.max >= 42.0


def test_console_exporter_of_a_real_service_prints_the_schedule_gauges(service_env: dict[str, str]) -> None:
    _seed_schedule(service_env["MAIL_POSTGRES_PRIMARY_DSN"])
    env = dict(service_env, OTEL_METRICS_EXPORTER="console", OTEL_METRIC_EXPORT_INTERVAL="300")
    with ServeProcess(env) as proc:
        proc.wait_ready()
        values: dict[str, list[float]] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            values = _exported_gauges(proc.stderr)
            if 3 in values.get("mail.attempt_schedule.depth", []):
                break
            time.sleep(0.2)
        assert 3 in values.get("mail.attempt_schedule.depth", []), proc.stderr[-4000:]
        assert any(600_000 <= v < 700_000 for v in values["mail.attempt_schedule.oldest_age_ms"])
        assert proc.stop() == 0


def _exported_gauges(output: str) -> dict[str, list[float]]:
    """Gauge values from the console exporter's JSON documents (written to stderr, not the log)."""
    values: dict[str, list[float]] = {}
    decoder = json.JSONDecoder()
    for match in re.finditer(r'^\{\s*$', output, re.MULTILINE):
        try:
            doc, _ = decoder.raw_decode(output, match.start())
        except ValueError:
            continue
        for rm in doc.get("resource_metrics", []):
            for sm in rm.get("scope_metrics", []):
                for metric in sm.get("metrics", []):
                    if metric["name"].startswith("mail.attempt_schedule."):
                        values.setdefault(metric["name"], []).extend(
                            p["value"] for p in metric["data"]["data_points"])
    return values
