"""The command consumer: stream entries -> durable deliveries (CONTRACT §4).

One step (`run_once`) reads one batch through the consumer group, validates every entry
(`mailtrio.commands`, pure), commits every outcome of the batch in one PostgreSQL transaction
(`mailtrio.store.intake`) and only then acknowledges the whole batch with one XACK.

Where a batch comes from, in order of priority:
1. this consumer's own pending entries (read before anything else at start, and again after any
   failure, so an entry read but not acknowledged is never forgotten);
2. entries pending on any consumer for longer than MAIL_REDIS_CLAIM_IDLE (XAUTOCLAIM), swept
   periodically, so a crashed instance loses nothing;
3. new entries (XREADGROUP `>` with a bounded BLOCK).

`run` repeats `run_once` until cancelled. A failure of Redis or PostgreSQL (connection reset,
restart, CLIENT KILL, lost consumer group) is logged and retried after a bounded exponential
backoff; nothing is acknowledged that was not committed, and the consumer never exits on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailtrio import commands, log, telemetry
from mailtrio.catalog import Catalog
from mailtrio.commands import Command, Malformed, Outcome
from mailtrio.config import Settings
from mailtrio.message import sender_domain
from mailtrio.store import Conn, Database, TransientError
from mailtrio.store import intake as store
from mailtrio.stream import Entry, Stream, StreamError

_log = log.get("mailtrio.intake")
_propagator = TraceContextTextMapPropagator()

MAX_BATCH = 500
MIN_BATCH = 16
# Entries of one batch are held in memory together: aim for at most this many bytes per batch.
BATCH_BYTES = 32 * 1024 * 1024
BLOCK_SECONDS = 2.0
# Bound on one batch transaction (lock waits on a racing consumer included).
COMMIT_TIMEOUT = 60.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


@dataclass
class IntakeCounts:
    """What one `run_once` did."""

    origin: str = "new"  # "pending", "claimed" or "new"
    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    # entries already recorded before (redelivered after a crash between commit and XACK)
    already_recorded: int = 0
    # pending entries that had been deleted from the stream (acknowledged, nothing to record)
    vanished: int = 0
    acked: int = 0


class Backoff:
    """Exponential backoff: first, doubling, capped; reset after a success."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Consumer:
    def __init__(self, settings: Settings, stream: Stream, db: Database, catalog: Catalog) -> None:
        self.settings = settings
        self.stream = stream
        self.db = db
        self.catalog = catalog
        self.ttl = timedelta(seconds=settings.idempotency_ttl)
        self.message_domain = sender_domain(settings.smtp_from)
        self.claim_idle = settings.redis_claim_idle
        self.claim_interval = max(0.05, min(settings.redis_claim_idle / 2, 30.0))
        self.block = min(BLOCK_SECONDS, self.claim_interval)
        self._group_ready = False
        # own pending entries are read first, from this cursor; None once drained
        self._pending_cursor: str | None = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._avg_entry_bytes = 1024.0

    # -- service ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.move_on_after(5.0):
                try:
                    await self.stream.ensure_group()
                    self._group_ready = True
                except StreamError as exc:
                    _log.warning("consumer group not ready yet; will retry", error=_describe(exc))
            _log.info(
                "command consumer started",
                stream=self.stream.name,
                group=self.stream.group,
                consumer=self.stream.consumer,
                claim_idle_s=self.claim_idle,
            )
            task_status.started()
            backoff = Backoff()
            failing = False
            while True:
                try:
                    await self.run_once()
                except Exception as exc:
                    delay = backoff.next()
                    level = _log.warning if _transient(exc) else _log.error
                    level(
                        "command consumer error; retrying",
                        error=_describe(exc),
                        step=_step(exc),
                        retry_in_s=delay,
                        exc_info=not _transient(exc),
                    )
                    self._after_failure()
                    failing = True
                    await trio.sleep(delay)
                    continue
                if failing:
                    _log.info("command consumer recovered")
                    failing = False
                backoff.reset()
        finally:
            _log.info("command consumer stopped")

    def _after_failure(self) -> None:
        # Whatever was read but not acknowledged is in our pending list: read it again first.
        self._pending_cursor = "0"
        self._group_ready = False

    async def run_once(self, *, block: float | None = None) -> IntakeCounts:
        """Process one batch: own pending entries, else claimable ones, else new ones."""
        if not self._group_ready:
            await self.stream.ensure_group()
            self._group_ready = True
        count = self._batch_count()
        if self._pending_cursor is not None:
            entries = await self.stream.read_pending(self._pending_cursor, count)
            if entries:
                self._pending_cursor = entries[-1][0]
                return await self.process(entries, origin="pending")
            self._pending_cursor = None
        if trio.current_time() >= self._next_claim:
            cursor, entries, deleted = await self.stream.claim(self.claim_idle, self._claim_cursor, count)
            if deleted:
                _log.warning(
                    "claimed stream entries no longer exist", count=len(deleted), stream_entry_ids=deleted[:20]
                )
            if cursor == "0-0":
                self._claim_cursor = "0-0"
                self._next_claim = trio.current_time() + self.claim_interval
            else:
                self._claim_cursor = cursor
            if entries:
                _log.info("claimed idle stream entries", count=len(entries))
                return await self.process(entries, origin="claimed")
        entries = await self.stream.read_new(count, self.block if block is None else block)
        return await self.process(entries, origin="new")

    def _batch_count(self) -> int:
        return max(MIN_BATCH, min(MAX_BATCH, int(BATCH_BYTES // max(1.0, self._avg_entry_bytes))))

    # -- one batch -------------------------------------------------------------------------
    async def process(self, entries: Sequence[Entry], *, origin: str = "new") -> IntakeCounts:
        """Validate, commit and acknowledge one batch of entries."""
        counts = IntakeCounts(origin=origin, read=len(entries))
        if not entries:
            return counts
        redelivered = origin != "new"
        now = datetime.now(UTC)
        has_template = self.catalog.has_template
        with telemetry.tracer.start_as_current_span(
            "intake batch",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.name": "process",
                "messaging.destination.name": self.stream.name,
                "messaging.consumer.group.name": self.stream.group,
                "messaging.batch.message_count": len(entries),
                "mail.intake.origin": origin,
            },
        ) as batch_span:
            batch_ctx = trace.set_span_in_context(batch_span)
            batch_link = [Link(batch_span.get_span_context())]
            spans: dict[str, Span] = {}
            try:
                outcomes: list[Outcome] = []
                raw: dict[str, Mapping[Any, Any]] = {}
                vanished: list[str] = []
                size = 0
                for entry_id, fields in entries:
                    if fields is None:
                        vanished.append(entry_id)
                        continue
                    size += sum(len(k) + len(v) for k, v in fields.items())
                    span = self._entry_span(entry_id, fields, batch_ctx, batch_link)
                    spans[entry_id] = span
                    outcome = commands.validate(entry_id, fields, now=now, has_template=has_template)
                    if isinstance(outcome, Command) and outcome.traceparent is None:
                        # keep a trace context on every delivery: the intake span's own
                        outcome = dataclasses.replace(outcome, traceparent=_traceparent_of(span))
                    outcomes.append(outcome)
                    raw[entry_id] = fields
                n = len(entries) - len(vanished)
                if n:
                    self._avg_entry_bytes = 0.7 * self._avg_entry_bytes + 0.3 * (size / n)

                result = await self._commit(outcomes, raw, redelivered)

                for cmd in result.accepted:
                    counts.accepted += 1
                    spans[cmd.stream_entry_id].set_attribute("mail.intake.outcome", "accepted")
                for cmd, existing in result.duplicates:
                    counts.duplicates += 1
                    span = spans[cmd.stream_entry_id]
                    span.set_attribute("mail.intake.outcome", "duplicate")
                    with trace.use_span(span, end_on_exit=False):
                        _log.info(
                            "stream command duplicate",
                            delivery_id=existing,
                            source=cmd.source,
                            stream_entry_id=cmd.stream_entry_id,
                        )
                for bad in result.rejected:
                    counts.rejected += 1
                    span = spans[bad.stream_entry_id]
                    span.set_attribute("mail.intake.outcome", "rejected")
                    span.set_attribute("mail.failure_code", bad.failure_code)
                    telemetry.malformed_commands.add(1, {"failure_code": bad.failure_code})
                    with trace.use_span(span, end_on_exit=False):
                        _log.warning(
                            "stream command rejected",
                            failure_code=bad.failure_code,
                            failure_detail=bad.failure_detail,
                            delivery_id=bad.delivery_id,
                            source=bad.source,
                            stream_entry_id=bad.stream_entry_id,
                        )
                for bad in result.already_rejected:
                    counts.already_recorded += 1
                    spans[bad.stream_entry_id].set_attribute("mail.intake.outcome", "already_recorded")
                if vanished:
                    counts.vanished = len(vanished)
                    _log.warning(
                        "pending stream entries no longer exist", count=len(vanished), stream_entry_ids=vanished[:20]
                    )
                counts.acked = await self.stream.ack([entry_id for entry_id, _ in entries])
                if counts.accepted:
                    _log.debug(
                        "stream batch committed",
                        origin=origin,
                        read=counts.read,
                        accepted=counts.accepted,
                        duplicates=counts.duplicates,
                        rejected=counts.rejected,
                    )
            except BaseException as exc:
                for span in spans.values():
                    span.set_status(Status(StatusCode.ERROR, "batch not committed or not acknowledged"))
                if isinstance(exc, Exception):
                    batch_span.record_exception(exc)
                raise
            finally:
                for span in spans.values():
                    span.end()
        return counts

    def _entry_span(
        self, entry_id: str, fields: Mapping[Any, Any], batch_ctx: otel_context.Context, batch_link: list[Link]
    ) -> Span:
        """The intake span of one entry: a child of the entry's traceparent (linked to the batch
        span), or of the batch span when the entry carries none (or an invalid one)."""
        tp = fields.get(b"traceparent")
        parent = batch_ctx
        links: list[Link] | None = None
        if tp is not None:
            try:
                text = tp.decode("ascii") if isinstance(tp, bytes) else str(tp)
            except UnicodeDecodeError:
                text = ""
            if commands.valid_traceparent(text):
                parent = _propagator.extract({"traceparent": text})
                links = batch_link
        return telemetry.tracer.start_span(
            "intake command",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={"messaging.message.id": entry_id, "messaging.destination.name": self.stream.name},
        )

    async def _commit(
        self, outcomes: list[Outcome], raw: Mapping[str, Mapping[Any, Any]], redelivered: bool
    ) -> store.BatchResult:
        """Commit the batch in one transaction. If the database refuses some value (it should
        not: validation keeps out what it cannot store), split the batch to find the entries it
        refuses and quarantine them, so that one entry never blocks the stream."""
        if not outcomes:
            return store.BatchResult()
        try:
            return await self._commit_tx(outcomes, raw, redelivered)
        except store.DataRejected as exc:
            if len(outcomes) > 1:
                mid = len(outcomes) // 2
                first = await self._commit(outcomes[:mid], raw, redelivered)
                second = await self._commit(outcomes[mid:], raw, redelivered)
                return _merge(first, second)
            only = outcomes[0]
            detail = f"rejected by the database: {_describe(exc)}"
            _log.error("database refused a stream entry", stream_entry_id=only.stream_entry_id, error=_describe(exc))
            if isinstance(only, Command):
                fallback = commands.conflict(only, detail, raw[only.stream_entry_id])
                fallback = dataclasses.replace(fallback, failure_code="invalid_field")
            else:
                # the quarantine row itself was refused: keep what is certainly storable
                fallback = dataclasses.replace(
                    only, delivery_id=None, source=None, fields={"error": "entry could not be stored"},
                    failure_detail=f"{only.failure_code}: {detail}",
                )
            return await self._commit_tx([fallback], raw, redelivered)

    async def _commit_tx(
        self, outcomes: Sequence[Outcome], raw: Mapping[str, Mapping[Any, Any]], redelivered: bool
    ) -> store.BatchResult:
        cmds = [o for o in outcomes if isinstance(o, Command)]
        bad = [o for o in outcomes if isinstance(o, Malformed)]

        def make_conflict(cmd: Command, detail: str) -> Malformed:
            return commands.conflict(cmd, detail, raw[cmd.stream_entry_id])

        async def _tx(conn: Conn) -> store.BatchResult:
            return await store.commit_batch(
                conn,
                cmds,
                bad,
                ttl=self.ttl,
                message_domain=self.message_domain,
                make_conflict=make_conflict,
                redelivered=redelivered,
            )

        with trio.fail_after(COMMIT_TIMEOUT):
            return await self.db.transaction(_tx)


def _merge(a: store.BatchResult, b: store.BatchResult) -> store.BatchResult:
    return store.BatchResult(
        accepted=a.accepted + b.accepted,
        duplicates=a.duplicates + b.duplicates,
        rejected=a.rejected + b.rejected,
        already_rejected=a.already_rejected + b.already_rejected,
        notified=a.notified or b.notified,
    )


def _traceparent_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (*StreamError, *TransientError, store.ReservationVanished))


def _step(exc: BaseException) -> str:
    if isinstance(exc, StreamError) and not isinstance(exc, trio.TooSlowError):
        return "redis"
    if isinstance(exc, trio.TooSlowError):
        return "deadline"
    return "postgres"


def _describe(exc: BaseException) -> str:
    text = " ".join((str(exc) or "").split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
