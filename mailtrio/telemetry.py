"""OpenTelemetry: tracer and meter providers and every instrument of CONTRACT §8.

Tracing is always on so that log lines carry trace ids; exporters are configured from the
standard OTEL_* variables and only decide where spans and metrics go. With no exporter
configured (neither OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER nor an OTLP endpoint), nothing
is exported.

Recording a span (its attributes, links and status, handed to the span processors) costs ~70 µs
of CPU, about a quarter of the service's work per delivery. So when no span exporter is
configured and OTEL_TRACES_SAMPLER is not set, spans are started unsampled: they still carry
trace and span ids (the producer's trace id when the command had a traceparent), which the log
lines show, but nothing records what nobody would read. With an exporter the SDK's default
applies (parent-based, always on); OTEL_TRACES_SAMPLER, when set, always decides.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler

from mailtrio import __version__, log

_log = log.get("mailtrio.telemetry")
# The global (proxy) tracer until `setup()` installs the provider; then the provider's own tracer
# (modules call `telemetry.tracer.start_span`, so they pick up the rebinding).
tracer: trace.Tracer = trace.get_tracer("mailtrio", __version__)
meter = metrics.get_meter("mailtrio", __version__)

# Counters and histograms are created on the global (proxy) meter so modules can import them at
# any time; they bind to the real provider once `setup()` installs it.
dead_letters = meter.create_counter(
    "mail.delivery.dead_letters", unit="{delivery}", description="Deliveries moved to dead_letter"
)
suppressed = meter.create_counter(
    "mail.delivery.suppressed", unit="{delivery}", description="Deliveries ended suppressed"
)
malformed_commands = meter.create_counter(
    "mail.stream_commands.malformed",
    unit="{command}",
    description="Stream commands rejected as malformed, by failure_code",
)
send_duration_ms = meter.create_histogram(
    "mail.provider.send.duration_ms", unit="ms", description="Duration of one provider send"
)
attempt_outcomes = meter.create_counter(
    "mail.attempt.outcomes", unit="{attempt}", description="Attempt outcomes, by status"
)


@dataclass
class QueueSnapshot:
    """Depth and oldest age of a queue, refreshed by a monitor task; read by the gauges' callbacks
    (the export thread never touches the database)."""

    depth: int = 0
    oldest_age_ms: float = 0.0


def _queue_gauges(snapshot: QueueSnapshot, names: tuple[str, str], unit: str, depth: str, oldest: str) -> None:
    """The depth and oldest-age gauges named `names`, observed from `snapshot`."""

    def depth_cb(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(snapshot.depth)

    def oldest_cb(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(snapshot.oldest_age_ms)

    meter.create_observable_gauge(names[0], callbacks=[depth_cb], unit=unit, description=depth)
    meter.create_observable_gauge(names[1], callbacks=[oldest_cb], unit="ms", description=oldest)


# Refreshed by `ScheduleMonitor` (one indexed query every few seconds).
schedule_snapshot = QueueSnapshot()
_queue_gauges(schedule_snapshot, ("mail.attempt_schedule.depth", "mail.attempt_schedule.oldest_age_ms"), "{delivery}",
              "Deliveries waiting in queued or rendered", "Age of the oldest waiting delivery on the schedule")
# Refreshed by the event publisher's monitor (every instance refreshes it, publishing or not).
outbox_snapshot = QueueSnapshot()
_queue_gauges(outbox_snapshot, ("mail.events.outbox.depth", "mail.events.outbox.oldest_age_ms"), "{event}",
              "Delivery events written but not yet published to the event stream",
              "Age of the oldest unpublished delivery event")
events_published = meter.create_counter(
    "mail.events.published", unit="{event}",
    description="Delivery events published to the event stream, by event type",
)


class ScheduleMonitor:
    """Refreshes `schedule_snapshot` every `interval` seconds with one indexed query.

    The gauges' callbacks (run by the metric reader at export time) only read the snapshot, so an
    export never queries the database; the snapshot is at most `interval` seconds old.
    """

    def __init__(self, db: Any, *, interval: float = 5.0, timeout: float = 10.0) -> None:
        self.db = db
        self.interval = interval
        self.timeout = timeout

    async def refresh(self) -> QueueSnapshot:
        """One refresh (the service's `run_once`): query, update the snapshot, return it."""
        from mailtrio.store import api as store_api

        with trio.fail_after(self.timeout):
            depth, oldest_age_ms = await store_api.schedule_gauges(self.db)
        schedule_snapshot.depth = depth
        schedule_snapshot.oldest_age_ms = float(oldest_age_ms)
        return schedule_snapshot

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _log.info("schedule monitor started", interval_s=self.interval)
        task_status.started()
        failing = False
        try:
            while True:
                started = trio.current_time()
                try:
                    await self.refresh()
                    failing = False
                except Exception as exc:
                    # Keep the last values; say so once per outage, not every few seconds.
                    if not failing:
                        _log.warning("schedule gauges refresh failed", error=f"{type(exc).__name__}: {exc}")
                    failing = True
                # The query reads the waiting slice of the schedule: with a huge backlog it slows
                # down, and the refresh backs off so it never takes more than ~5% of the time.
                await trio.sleep(max(self.interval, 20 * (trio.current_time() - started)))
        finally:
            _log.info("schedule monitor stopped")


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush and stop both providers, each step within `timeout` seconds (the caller also
        stops waiting then: the exporters' own retries against a stalled collector are longer)."""
        millis = max(1, int(timeout * 1000))
        try:
            self.tracer_provider.force_flush(timeout_millis=millis)
        finally:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=millis)


def _exporter_names(env: Mapping[str, str], kind: str) -> list[str]:
    explicit = env.get(f"OTEL_{kind}_EXPORTER", "").strip()
    if explicit:
        return [n.strip() for n in explicit.split(",") if n.strip() and n.strip() != "none"]
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{kind}_ENDPOINT")
    return ["otlp"] if endpoint else []


def _otlp_protocol(env: Mapping[str, str], kind: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{kind}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()


# The OTLP exporters retry a failed export themselves (exponential with their own ±20% jitter,
# within the export timeout, OTEL_EXPORTER_OTLP_TIMEOUT), on the SDK's export threads: no loop of
# mailtrio's, so mailtrio.backoff has no part in it; their retries never hold the service, and at
# exit the flush is bounded (cli.TELEMETRY_FLUSH_BOUND).
def _span_exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout carries only the JSON log lines
        return ConsoleSpanExporter(out=sys.stderr)
    if name == "otlp":
        if _otlp_protocol(env, "TRACES").startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (otlp, console, none)")


def _metric_reader(name: str, env: Mapping[str, str]) -> MetricReader:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr))
    if name == "otlp":
        if _otlp_protocol(env, "METRICS").startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            return PeriodicExportingMetricReader(OTLPMetricExporter())
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return PeriodicExportingMetricReader(GrpcMetricExporter())
    raise ValueError(f"unsupported OTEL_METRICS_EXPORTER {name!r} (otlp, console, none)")


def check_env(env: Mapping[str, str] | None = None) -> None:
    """Raise ValueError for an exporter name we cannot build (a configuration error)."""
    env = os.environ if env is None else env
    for name in _exporter_names(env, "TRACES"):
        if name not in ("otlp", "console"):
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    for name in _exporter_names(env, "METRICS"):
        if name not in ("otlp", "console"):
            raise ValueError(f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r}")


def setup(
    instance_id: str,
    env: Mapping[str, str] | None = None,
    extra_readers: Iterable[MetricReader] = (),
    extra_span_processor: Callable[[TracerProvider], None] | None = None,
) -> Telemetry:
    """Install global tracer and meter providers. Call once per process."""
    env = os.environ if env is None else env
    attrs: dict[str, Any] = {"service.name": env.get("OTEL_SERVICE_NAME") or "mailtrio"}
    attrs["service.version"] = __version__
    attrs["service.instance.id"] = instance_id
    resource = Resource.create(attrs)
    exporters = _exporter_names(env, "TRACES")
    tp = TracerProvider(resource=resource, sampler=_sampler(env, bool(exporters) or extra_span_processor is not None))
    for name in exporters:
        exporter = _span_exporter(name, env)
        tp.add_span_processor(
            SimpleSpanProcessor(exporter) if name == "console" else BatchSpanProcessor(exporter)
        )
    if extra_span_processor is not None:
        extra_span_processor(tp)
    readers = [_metric_reader(n, env) for n in _exporter_names(env, "METRICS")]
    readers.extend(extra_readers)
    mp = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tp)
    metrics.set_meter_provider(mp)
    global tracer
    tracer = tp.get_tracer("mailtrio", __version__)
    return Telemetry(tp, mp)


def _sampler(env: Mapping[str, str], exported: bool) -> Sampler | None:
    """None (the SDK reads OTEL_TRACES_SAMPLER, default parent-based always-on) when spans go
    somewhere or a sampler is configured; otherwise unsampled spans (ids only, see above)."""
    if exported or env.get("OTEL_TRACES_SAMPLER", "").strip():
        return None
    return ALWAYS_OFF
