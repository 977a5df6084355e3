"""The scheduler and the worker pool in-process against a real database and SMTP server: traces
(render and SMTP send under the attempt, the attempt linked to the producer), the contract's
metrics, run_once, and a pool that drains when its channel closes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mailtrio import bridge
from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.providers.build import build_provider
from mailtrio.scheduler import Scheduler
from mailtrio.store import Database
from mailtrio.workers import Job, WorkerPool
from tests.api.test_telemetry import collect, counter_value
from tests.engine import helpers as h
from tests.engine.conftest import smtp_env
from tests.support.serve import TEMPLATES
from tests.support.smtpserver import SmtpTestServer

PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"


def spans_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # installed by the metric_reader fixture
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def poll(condition: Callable[[], bool], *, within: float) -> None:
    """Check `condition` (a database read) every 50 ms, for at most `within` seconds."""
    with trio.fail_after(within):
        for _ in range(int(within / 0.05) + 1):
            if condition():
                return
            await trio.sleep(0.05)


async def run_engine(settings: Settings, dsn: str, until: Callable[[], bool], within: float = 30) -> WorkerPool:
    async with bridge.open_loop():
        db = Database(dsn, 4)
        await db.open()
        try:
            send, receive = trio.open_memory_channel[Job](0)
            pool = WorkerPool(settings, db, Catalog.load(TEMPLATES, "en"), build_provider(settings), receive)
            scheduler = Scheduler(settings, db, send, pool)
            with trio.fail_after(within + 10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(pool.run)
                    async with trio.open_nursery() as feeders:
                        await feeders.start(scheduler.run)
                        await poll(until, within=within)
                        feeders.cancel_scope.cancel()
                    # the scheduler closed the channel: the pool returns once its attempts are recorded
            return pool
        finally:
            await db.close()


async def test_traces_and_metrics_of_every_outcome(
    database: str, service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer], metric_reader: Any
) -> None:
    exporter = spans_exporter()
    server = smtp_factory(rules=[{"match": "^defer@", "action": "defer"},
                                 {"match": "^suppress@", "action": "suppress"}])
    settings = Settings.from_env(smtp_env(service_env, server, MAIL_RETRY_LADDER="50ms"))
    before = {
        "accepted": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_accepted"),
        "deferred": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_deferred"),
        "rejected": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_rejected"),
        "dead": counter_value(metric_reader, "mail.delivery.dead_letters"),
        "suppressed": counter_value(metric_reader, "mail.delivery.suppressed"),
    }
    h.insert(database, [
        h.delivery("ok", traceparent=f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"),
        h.delivery("deferred", to=["defer@example.com"]),
        h.delivery("suppressed", to=["suppress@example.com"]),
        h.delivery("broken", template_id="newsletter", variables={}),
    ])
    ids = ["ok", "deferred", "suppressed", "broken"]

    def done() -> bool:
        return {r["status"] for r in h.deliveries(database, ids).values()} <= set(h.TERMINAL)

    pool = await run_engine(settings, database, done)
    rows = h.deliveries(database, ids)
    assert [rows[i]["status"] for i in ids] == ["sent", "dead_letter", "suppressed", "failed"]
    assert pool.attempts == 4  # ok, deferred twice, suppressed; the broken one never reached a worker

    after = {
        "accepted": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_accepted"),
        "deferred": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_deferred"),
        "rejected": counter_value(metric_reader, "mail.attempt.outcomes", status="provider_rejected"),
        "dead": counter_value(metric_reader, "mail.delivery.dead_letters"),
        "suppressed": counter_value(metric_reader, "mail.delivery.suppressed"),
    }
    assert {k: after[k] - before[k] for k in after} == {
        "accepted": 1, "deferred": 2, "rejected": 1, "dead": 1, "suppressed": 1}
    durations = collect(metric_reader)["mail.provider.send.duration_ms"].data_points
    assert sum(p.count for p in durations) >= 4

    spans = exporter.get_finished_spans()
    attempts = [s for s in spans if s.name == "attempt"]
    by_delivery: dict[str, list[Any]] = {}
    for s in attempts:
        by_delivery.setdefault(s.attributes["mail.delivery_id"], []).append(s)
    assert sorted(len(v) for v in by_delivery.values()) == [1, 1, 1, 2]
    [ok_attempt] = by_delivery["ok"]
    assert [format(link.context.trace_id, "032x") for link in ok_attempt.links] == [PRODUCER_TRACE]
    assert [format(link.context.span_id, "016x") for link in ok_attempt.links] == [PRODUCER_SPAN]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == ok_attempt.context.span_id]
    assert sorted(s.name for s in children) == ["render", "smtp send"]
    [send_span] = [s for s in children if s.name == "smtp send"]
    host, port = server.addr.rsplit(":", 1)
    assert send_span.kind == SpanKind.CLIENT
    assert (send_span.attributes["server.address"], send_span.attributes["server.port"]) == (host, int(port))
    assert ok_attempt.attributes["mail.attempt_status"] == "provider_accepted"
    [broken] = by_delivery["broken"]
    assert broken.status.status_code.name == "ERROR"
    # the retry of the deferred delivery reuses its content: no render span the second time
    deferred_renders = [s for s in spans if s.name == "render"
                        and s.parent.span_id in {a.context.span_id for a in by_delivery["deferred"]}]
    assert len(deferred_renders) == 1
    exporter.shutdown()


async def test_run_once_claims_for_idle_workers_only(database: str, service_env: dict[str, str]) -> None:
    settings = Settings.from_env(dict(service_env, MAIL_ATTEMPT_WORKER_CONCURRENCY="3"))
    h.insert(database, [h.delivery(f"r{i}") for i in range(10)])
    async with bridge.open_loop():
        db = Database(database, 4)
        await db.open()
        try:
            send, receive = trio.open_memory_channel[Job](0)
            pool = WorkerPool(settings, db, Catalog.load(TEMPLATES, "en"), build_provider(settings), receive)
            scheduler = Scheduler(settings, db, send, pool)
            assert await scheduler.run_once() == {"rescued": 0, "claimed": 0}  # no worker yet
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.run)
                await trio.sleep(0.1)
                assert pool.idle == 3
                assert await scheduler.run_once() == {"rescued": 0, "claimed": 3}
                await poll(lambda: h.status_counts(database).get("sent", 0) >= 3, within=10)
                await send.aclose()  # the pool drains and returns
            assert h.status_counts(database) == {"sent": 3, "queued": 7}
        finally:
            await db.close()
