"""Which spans are recorded: everything when spans go somewhere, ids only when they go nowhere."""

from __future__ import annotations

import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailtrio import telemetry

PRODUCER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _spans(env: dict[str, str], exported: bool) -> tuple[trace.Span, trace.Span]:
    provider = TracerProvider(sampler=telemetry._sampler(env, exported))
    tracer = provider.get_tracer("t")
    root = tracer.start_span("attempt")
    child = tracer.start_span("intake command",
                              context=TraceContextTextMapPropagator().extract({"traceparent": PRODUCER}))
    return root, child


def test_no_exporter_no_sampler_gives_ids_without_recording() -> None:
    root, child = _spans({}, exported=False)
    assert not root.is_recording() and not child.is_recording()
    # log lines still get real ids, and a command's span keeps its producer's trace id
    assert root.get_span_context().is_valid and root.get_span_context().span_id != 0
    assert child.get_span_context().trace_id == int(PRODUCER.split("-")[1], 16)
    assert child.get_span_context().span_id != int(PRODUCER.split("-")[2], 16)


def test_an_exporter_records_every_span() -> None:
    root, child = _spans({}, exported=True)
    assert root.is_recording() and child.is_recording()
    assert child.get_span_context().trace_id == int(PRODUCER.split("-")[1], 16)


def test_a_configured_sampler_always_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    # the SDK reads OTEL_TRACES_SAMPLER from the process environment, as the service's setup does
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    root, _ = _spans(dict(os.environ), exported=False)
    assert root.is_recording()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    root, _ = _spans(dict(os.environ), exported=True)
    assert not root.is_recording()
