"""Intake spans carry the OpenTelemetry messaging attributes, `messaging.operation.type` included."""

from __future__ import annotations

from typing import Any

import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mailtrio.config import Settings
from tests.intake.conftest import drain, entry, opened

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_intake_spans_name_the_operation(service_env: dict[str, str], redis_client: redis.Redis,
                                               stream_key: str, metric_reader: Any) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # installed by the metric_reader fixture
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    entry_id = redis_client.xadd(stream_key, entry(delivery_id="d-otel", traceparent=f"00-{TRACE}-00f067aa0ba902b7-01"))
    async with opened(Settings.from_env(service_env)) as w:
        await drain(w.consumer)
    spans = [s for s in exporter.get_finished_spans() if s.attributes.get("messaging.destination.name") == stream_key]
    exporter.shutdown()
    batch = [s for s in spans if s.name == "intake batch" and s.attributes.get("messaging.batch.message_count")]
    command = [s for s in spans if s.name == "intake command"]
    assert batch and len(command) == 1
    for span in [*batch, *command]:
        assert span.kind == SpanKind.CONSUMER
        assert span.attributes["messaging.system"] == "redis"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.operation.name"] == "process"
    assert command[0].attributes["messaging.message.id"] == entry_id.decode()
    assert format(command[0].context.trace_id, "032x") == TRACE
