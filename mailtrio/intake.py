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

`run` does the same until cancelled, with overlap: while a batch of new entries is being
committed and acknowledged, the next one is already read and validated; a large one (a backlog:
OVERLAP_MIN entries or more) is committed at once when nothing in it can be decided differently by
the batch still committing (`may_commit_together`: no idempotency key or delivery id shared with
it, save exact repeats); otherwise it waits, so the earlier of two commands for one key or id
wins, as in stream order. At most two commits are in flight. Acknowledgements of batches
committed within ACK_GATHER of each other go out together in one XACK. A failure of Redis or
PostgreSQL (connection reset, restart, CLIENT KILL, lost consumer group) is logged and retried
after a bounded exponential backoff with jitter, starting again from this consumer's pending
entries; nothing is acknowledged that was not committed, and the consumer
never exits on its own.

Staleness and trimming. An entry whose id (the Redis clock at XADD) is older than
MAIL_IDEMPOTENCY_TTL is quarantined as `stale_command` without being validated: its idempotency
reservation may be gone, so it must never become a delivery (a consumer group re-created on an
untrimmed stream reads everything again from ID 0). Every TRIM_INTERVAL (at most; sooner for a
short TTL) the consumer trims the stream of entries older than the TTL that every group has read
and acknowledged (`Stream.trim`, XTRIM MINID), so the stream stays bounded.

Poison batches. After a batch fails for a reason that is not a connection problem, this
consumer's pending entries are processed one at a time; an entry that fails alone is parked with
its own backoff (left pending, skipped by reads and claims until it is due again), so one such
entry delays the entries beside it by one retry at most.

Tracing: one `intake batch` span per batch, and an `intake command` span for each entry that
carries a W3C `traceparent`, as a child of it (linked to the batch span). A delivery keeps the
producer's `traceparent`, or the batch span's when the entry had none, so attempt spans can link
to it. Rejection and duplicate log lines are written inside the entry's span (or the batch's).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailtrio import commands, log, shutdown, telemetry
from mailtrio.backoff import Backoff
from mailtrio.catalog import Catalog
from mailtrio.commands import Command, Malformed, Outcome
from mailtrio.config import Settings
from mailtrio.enums import FailureCode
from mailtrio.message import sender_domain
from mailtrio.store import Conn, Database, TransientError
from mailtrio.store import intake as store
from mailtrio.stream import CALL_TIMEOUT, Entry, Stream, StreamError, entry_ms

_log = log.get("mailtrio.intake")
_propagator = TraceContextTextMapPropagator()

# Larger batches amortise per-statement work on both sides (~15-20% less CPU per command than
# 500); a batch holds at most BATCH_BYTES of entries whatever their count.
MAX_BATCH = 2000
MIN_BATCH = 16
# Entries of one batch are held in memory together: aim for at most this many bytes per batch.
BATCH_BYTES = 32 * 1024 * 1024
BLOCK_SECONDS = 2.0
# Bound on one batch transaction (lock waits on a racing consumer included).
COMMIT_TIMEOUT = 60.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
PAUSE_GC = True
# An entry whose payload is larger than this is validated in a worker thread (parsing and
# checking 512 KiB takes milliseconds); smaller ones inline, yielding every CHECKPOINT_EVERY.
OFF_LOOP_BYTES = 64 * 1024
CHECKPOINT_EVERY = 64
# Trim the stream this often at most (half the idempotency TTL when that is shorter).
TRIM_INTERVAL = 60.0
# Acknowledgements of batches committed while others are in flight are gathered for up to
# ACK_GATHER seconds (or ACK_GATHER_MAX ids) and sent in one XACK: each call through the asyncio
# bridge costs ~0.6-0.8 ms of CPU, as much as the rest of a lone command's intake. A committed
# entry not yet acknowledged is only pending: read again, it is a duplicate of itself.
ACK_GATHER = 0.05
ACK_GATHER_MAX = 2000
# A batch read while the one before it is committing is committed beside it (when
# may_commit_together allows) only from this many entries: a backlog's batches are full, while
# a trickle's are a few entries each, better merged into the next commit (`_top_up`) than
# committed at once (measured: beside, the p99 from XADD to 250 at 200 commands/s grew by ~5 ms).
OVERLAP_MIN = 200
# Backoff of an entry that failed alone (poison): first, doubling, capped.
PARK_FIRST = 1.0
PARK_MAX = 300.0


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




@dataclass
class _Batch:
    """One batch between validation and acknowledgement, with its spans."""

    origin: str
    entries: Sequence[Entry]
    outcomes: list[Outcome] = field(default_factory=list)
    raw: dict[str, Mapping[Any, Any]] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)
    span: Span = trace.INVALID_SPAN
    # per-entry intake spans, for entries carrying a traceparent
    spans: dict[str, Span] = field(default_factory=dict)

    @contextmanager
    def use(self, entry_id: str | None, outcome: str | None = None, **attrs: str) -> Iterator[None]:
        """Make the entry's span (or the batch span) current, e.g. for a log line."""
        span = self.spans.get(entry_id, self.span) if entry_id is not None else self.span
        if outcome is not None and entry_id in self.spans:
            span.set_attribute("mail.intake.outcome", outcome)
            for k, v in attrs.items():
                span.set_attribute(f"mail.{k}", v)
        with trace.use_span(span, end_on_exit=False):
            yield

    def absorb(self, other: _Batch) -> None:
        """Take the entries of `other` (read right after this one) into this batch; `other`'s span
        ends (its per-entry spans stay, linked to it)."""
        self.entries = [*self.entries, *other.entries]
        self.outcomes.extend(other.outcomes)
        self.raw.update(other.raw)
        self.vanished.extend(other.vanished)
        self.spans.update(other.spans)
        other.spans = {}
        self.span.set_attribute("messaging.batch.message_count", len(self.entries))
        other.span.set_attribute("mail.intake.merged", True)
        other.span.end()

    def end(self, *, error: bool = False, exc: BaseException | None = None) -> None:
        if exc is not None and isinstance(exc, Exception):
            self.span.record_exception(exc)
        for span in (*self.spans.values(), self.span):
            if error:
                span.set_status(Status(StatusCode.ERROR, "batch not committed or not acknowledged"))
            span.end()
        self.spans.clear()
        self.span = trace.INVALID_SPAN


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
        self._failing_since: float | None = None
        self.trim_interval = max(0.5, min(TRIM_INTERVAL, settings.idempotency_ttl / 2))
        self._next_trim = 0.0
        # after a non-transient failure, pending entries are read one at a time
        self._isolate = False
        # entry id -> (trio time it may be tried again, failures so far)
        self.parked: dict[str, tuple[float, int]] = {}
        self._last_ids: list[str] = []
        # acknowledgements of committed batches still running (see _pipeline), oldest first
        self._settling: list[trio.Event] = []
        # ids gathered for the next XACK (see _ack_gathered); the round that will send them
        self._acks: list[str] = []
        self._ack_round: trio.Event | None = None
        self._ack_now = trio.Event()
        # batches committed while the one before was still being committed
        self.overlapped = 0

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
            backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX)
            while True:
                try:
                    await self._pipeline(on_success=backoff.reset)
                except Exception as group:
                    err = _leaf(group)
                    delay = backoff.next()
                    level = _log.warning if _transient(err) else _log.error
                    level(
                        "command consumer error; retrying",
                        error=_describe(err),
                        step=_step(err),
                        retry_in_s=round(delay, 3),
                        exc_info=not _transient(err),
                    )
                    self._after_failure(err)
                    if _step(err) == "redis":
                        await self.stream.reset()
                    await trio.sleep(delay)
        finally:
            _log.info("command consumer stopped", overlapped_commits=self.overlapped)

    async def _pipeline(self, *, on_success: Any) -> None:
        """Process batches until an error: while one batch of new entries is being committed, the
        previous one is acknowledged and the next one is read and validated. That next batch, when
        it holds OVERLAP_MIN entries or more, is committed beside it when `may_commit_together`
        allows (and the one after it is read and validated meanwhile); otherwise it starts after
        the previous commit returned. A failure of either commit fails the pipeline: what was not
        committed is read again from this consumer's pending entries. Pending and claimed batches
        are processed with nothing in flight, every committed batch acknowledged first."""
        ready: _Batch | None = None
        self._settling = []
        async with trio.open_nursery() as settling:
            while True:
                if ready is None:
                    await self._settled()
                    origin, entries = await self._next_entries(None)
                    ready = await self._prepare(entries, origin)
                if ready.origin != "new" or not ready.entries:
                    await self._settled()
                    await self._finish(ready)
                    ready = None
                else:
                    current = ready
                    ready = None
                    nxt: list[_Batch] = []
                    committed = trio.Event()
                    read_during_commit = False

                    async def commit(batch: _Batch = current, done: trio.Event = committed) -> None:
                        await self._finish(batch, settling=settling)
                        done.set()

                    # the commands being committed (`_finish` lets go of the batch's list, not
                    # of the list itself)
                    in_flight = current.outcomes
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(commit)
                            if self._reading_new():
                                entries = await self.stream.read_new(self._batch_count(), self.block)
                                read_during_commit = not committed.is_set()
                                later = await self._prepare(entries, "new", checkpoints=True)
                                if (len(later.entries) >= OVERLAP_MIN and not committed.is_set()
                                        and may_commit_together(in_flight, later.outcomes)):
                                    # A second commit in flight: nothing in it can be decided
                                    # differently by the one before (see may_commit_together).
                                    second = trio.Event()

                                    async def commit_later(batch: _Batch = later, done: trio.Event = second) -> None:
                                        await self._finish(batch, settling=settling)
                                        done.set()

                                    nursery.start_soon(commit_later)
                                    self.overlapped += 1
                                    if self._reading_new():
                                        entries = await self.stream.read_new(self._batch_count(), self.block)
                                        read_during_commit = not (committed.is_set() and second.is_set())
                                        nxt.append(await self._prepare(entries, "new", checkpoints=True))
                                else:
                                    nxt.append(later)
                    except BaseException:
                        for batch in nxt:
                            batch.end(error=True)
                        raise
                    if nxt:
                        ready = nxt[0]
                        if read_during_commit:
                            # entries that arrived during the rest of that commit join this batch;
                            # a read that returned after the commit already saw everything
                            await self._top_up(ready)
                on_success()
                if self._failing_since is not None:
                    self._failing_since = None
                    _log.info("command consumer recovered")

    def _reading_new(self) -> bool:
        """Whether the next batch comes from new entries (not this consumer's pending ones, and
        no sweep of idle entries is due)."""
        return self._pending_cursor is None and trio.current_time() < self._next_claim

    async def _top_up(self, batch: _Batch) -> None:
        """The next batch was read when the previous commit started: what arrived during that
        commit joins it now (one quick read, without waiting), instead of waiting for one more
        commit. Under load batches are full and nothing is read here."""
        room = self._batch_count() - len(batch.entries)
        if room <= 0 or not batch.entries or batch.origin != "new" or self._pending_cursor is not None:
            return
        entries = await self.stream.read_new(room, 0.0)
        if entries:
            more = await self._prepare(entries, "new", checkpoints=True)
            batch.absorb(more)

    async def _settled(self) -> None:
        """Wait until every committed batch is acknowledged (or its acknowledgement failed)."""
        while self._settling:
            self._ack_now.set()  # what is gathered goes now
            await self._settling.pop(0).wait()

    async def _ack_gathered(self, ids: list[str]) -> None:
        """Acknowledge `ids` in one XACK with those of the batches committed within ACK_GATHER
        after the first of them (the first caller sends for all; the others wait for that).
        Cancelled meanwhile (the service stops), what was gathered is still sent, shielded and
        bounded by the shutdown deadline; what cannot be is read again later as a duplicate of
        itself. Raises what the XACK raised (every caller of the round fails with the pipeline)."""
        self._acks.extend(ids)
        if len(self._acks) >= ACK_GATHER_MAX:
            self._ack_now.set()
        round_ = self._ack_round
        if round_ is not None:
            await round_.wait()
            return
        round_ = self._ack_round = trio.Event()
        try:
            with trio.move_on_after(ACK_GATHER):
                await self._ack_now.wait()
        finally:
            gathered, self._acks = self._acks, []
            self._ack_round = None
            self._ack_now = trio.Event()
            try:
                with shutdown.shielded(CALL_TIMEOUT):
                    await self.stream.ack(gathered)
            finally:
                round_.set()

    def _after_failure(self, err: BaseException | None = None) -> None:
        # Whatever was read but not acknowledged is in our pending list: read it again first.
        self._pending_cursor = "0"
        self._group_ready = False
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        if err is not None and not _transient(err):
            if self._isolate and len(self._last_ids) == 1:
                self._park(self._last_ids[0], err)
            # the next pending entries go one at a time, so the culprit is found in one retry
            self._isolate = True

    def _park(self, entry_id: str, err: BaseException) -> None:
        _, failures = self.parked.get(entry_id, (0.0, 0))
        delay = min(PARK_MAX, PARK_FIRST * 2**failures)
        self.parked[entry_id] = (trio.current_time() + delay, failures + 1)
        _log.error(
            "stream entry failed alone; parked and retried later",
            stream_entry_id=entry_id,
            failures=failures + 1,
            retry_in_s=delay,
            error=_describe(err),
        )

    def _unparked(self, entries: list[Entry]) -> list[Entry]:
        """Entries not parked (or parked and due again)."""
        if not self.parked:
            return entries
        now = trio.current_time()
        return [e for e in entries if self.parked.get(e[0], (0.0, 0))[0] <= now]

    async def _maybe_trim(self) -> None:
        now = trio.current_time()
        if now < self._next_trim:
            return
        self._next_trim = now + self.trim_interval
        try:
            deleted, minid = await self.stream.trim(self.settings.idempotency_ttl)
        except Exception as exc:  # trimming is maintenance: it never stops intake
            _log.warning("command stream trim failed; tried again later", error=_describe(exc),
                         retry_in_s=self.trim_interval)
            return
        if deleted:
            _log.info("command stream trimmed", deleted=deleted, minid=minid, stream=self.stream.name)

    async def run_once(self, *, block: float | None = None) -> IntakeCounts:
        """Process one batch: own pending entries, else claimable ones, else new ones."""
        origin, entries = await self._next_entries(block)
        return await self._finish(await self._prepare(entries, origin))

    async def _next_entries(self, block: float | None) -> tuple[str, list[Entry]]:
        if not self._group_ready:
            await self.stream.ensure_group()
            self._group_ready = True
        await self._maybe_trim()
        if self.parked and self._pending_cursor is None:
            now = trio.current_time()
            if any(due <= now for due, _ in self.parked.values()):
                self._pending_cursor = "0"  # a parked entry is due: look at our pending list again
        count = self._batch_count()
        while self._pending_cursor is not None:
            entries = await self.stream.read_pending(self._pending_cursor, 1 if self._isolate else count)
            if not entries:
                self._pending_cursor = None
                self._isolate = False
                break
            self._pending_cursor = entries[-1][0]
            entries = self._unparked(entries)
            if entries:
                return "pending", entries
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
            entries = self._unparked(entries)
            if entries:
                _log.info("claimed idle stream entries", count=len(entries))
                return "claimed", entries
        return "new", await self.stream.read_new(count, self.block if block is None else block)

    def _batch_count(self) -> int:
        return max(MIN_BATCH, min(MAX_BATCH, int(BATCH_BYTES // max(1.0, self._avg_entry_bytes))))

    # -- one batch -------------------------------------------------------------------------
    async def process(self, entries: Sequence[Entry], *, origin: str = "new") -> IntakeCounts:
        """Validate, commit and acknowledge one batch of entries."""
        return await self._finish(await self._prepare(entries, origin))

    async def _prepare(self, entries: Sequence[Entry], origin: str, *, checkpoints: bool = False) -> _Batch:
        """Validate a batch (pure CPU work): yield every CHECKPOINT_EVERY entries so that nothing
        else waits long (a commit running beside it keeps its round trips going), and validate
        large entries in a worker thread. `checkpoints` is kept for callers; it is always on."""
        batch = _Batch(origin=origin, entries=entries)
        if not entries:
            return batch
        batch.span = telemetry.tracer.start_span(
            "intake batch",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.name": self.stream.name,
                "messaging.consumer.group.name": self.stream.group,
                "messaging.batch.message_count": len(entries),
                "mail.intake.origin": origin,
            },
        )
        # Validation allocates many short-lived, acyclic objects (parsed payloads): automatic
        # cyclic GC passes during the loop cost ~15% of it and find nothing, so they wait until
        # the batch is validated (reference counting still frees everything as usual).
        gc_was_enabled = gc.isenabled() and PAUSE_GC
        if gc_was_enabled:
            gc.disable()
        try:
            batch_tp = _traceparent_of(batch.span)
            link = [Link(batch.span.get_span_context())]
            now = datetime.now(UTC)
            now_ms = now.timestamp() * 1000.0
            ttl_ms = self.settings.idempotency_ttl * 1000.0
            has_template = self.catalog.has_template
            validate = commands.validate
            accept_row = store.accept_row
            message_domain = self.message_domain
            outcomes = batch.outcomes
            raw = batch.raw
            size = 0
            for i, (entry_id, fields) in enumerate(entries):
                if i % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                    await trio.lowlevel.checkpoint()
                if fields is None:
                    batch.vanished.append(entry_id)
                    continue
                payload = fields.get(b"payload")
                payload_size = len(payload) if payload else 0
                size += payload_size + 256
                tp = fields.get(b"traceparent")
                if tp is not None:
                    self._entry_span(batch, entry_id, tp, link)
                born = entry_ms(entry_id)
                if born is not None and now_ms - born > ttl_ms:
                    outcome: Outcome = commands.stale(
                        entry_id, fields, (now_ms - born) / 1000.0, self.settings.idempotency_ttl
                    )
                elif payload_size > OFF_LOOP_BYTES:
                    outcome = await trio.to_thread.run_sync(
                        functools.partial(validate, entry_id, fields, now=now, has_template=has_template)
                    )
                else:
                    outcome = validate(entry_id, fields, now=now, has_template=has_template)
                if type(outcome) is Command:
                    if outcome.traceparent is None:
                        # every delivery keeps a trace context: the intake batch span's own
                        outcome.traceparent = batch_tp
                    # its database row too, while the previous batch is being committed
                    outcome.row = accept_row(outcome, message_domain)
                outcomes.append(outcome)
                raw[entry_id] = fields
            n = len(entries) - len(batch.vanished)
            if n:
                self._avg_entry_bytes = 0.7 * self._avg_entry_bytes + 0.3 * (size / n)
        except BaseException:
            batch.end(error=True)
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        return batch

    def _entry_span(self, batch: _Batch, entry_id: str, tp: Any, link: list[Link]) -> None:
        """The intake span of an entry that carries a trace context: a child of its traceparent,
        linked to the batch span (entries without one are covered by the batch span)."""
        try:
            text = tp.decode("ascii") if isinstance(tp, bytes) else str(tp)
        except UnicodeDecodeError:
            return
        if not commands.valid_traceparent(text):
            return
        batch.spans[entry_id] = telemetry.tracer.start_span(
            "intake command",
            context=_propagator.extract({"traceparent": text}),
            kind=SpanKind.CONSUMER,
            links=link,
            attributes={"messaging.message.id": entry_id, "messaging.destination.name": self.stream.name,
                        "messaging.system": "redis", "messaging.operation.name": "process",
                        "messaging.operation.type": "process"},
        )

    async def _finish(self, batch: _Batch, *, settling: trio.Nursery | None = None) -> IntakeCounts:
        """Commit every outcome of a prepared batch in one transaction, then acknowledge it.

        With `settling`, the acknowledgement and the batch's log lines run there, so that the
        next commit can start at once (`_settled` waits for them); the counts returned then hold
        what was committed, and are completed when the batch is acknowledged."""
        counts = IntakeCounts(origin=batch.origin, read=len(batch.entries))
        if not batch.entries:
            return counts
        ids = self._last_ids = [entry_id for entry_id, _ in batch.entries]
        try:
            result = await self._commit(batch.outcomes, batch.raw, batch.origin != "new")
        except BaseException as exc:
            batch.end(error=True, exc=exc)
            raise
        counts.accepted = len(result.accepted)
        # The acknowledgement needs the ids, the duplicates and rejections and the spans: the
        # batch's entries, outcomes and rows are let go now rather than after it.
        result.accepted = []
        batch.outcomes = []
        batch.raw = {}
        if settling is None:
            await self._settle(batch, ids, result, counts)
        else:
            done = trio.Event()
            self._settling.append(done)
            settling.start_soon(self._settle, batch, ids, result, counts, done)
        return counts

    async def _settle(
        self,
        batch: _Batch,
        ids: list[str],
        result: store.BatchResult,
        counts: IntakeCounts,
        done: trio.Event | None = None,
    ) -> None:
        """Log what a committed batch decided, acknowledge its entries and end its spans."""
        try:
            for cmd, existing in result.duplicates:
                counts.duplicates += 1
                with batch.use(cmd.stream_entry_id, "duplicate"):
                    _log.info(
                        "stream command duplicate",
                        delivery_id=existing,
                        source=cmd.source,
                        stream_entry_id=cmd.stream_entry_id,
                    )
            for bad in result.rejected:
                counts.rejected += 1
                telemetry.malformed_commands.add(1, {"failure_code": bad.failure_code})
                with batch.use(bad.stream_entry_id, "rejected", failure_code=bad.failure_code):
                    _log.warning(
                        "stream command rejected",
                        failure_code=bad.failure_code,
                        failure_detail=bad.failure_detail,
                        delivery_id=bad.delivery_id,
                        source=bad.source,
                        stream_entry_id=bad.stream_entry_id,
                    )
            counts.already_recorded = len(result.already_rejected)
            if batch.vanished:
                counts.vanished = len(batch.vanished)
                with batch.use(None):
                    _log.warning(
                        "pending stream entries no longer exist",
                        count=len(batch.vanished),
                        stream_entry_ids=batch.vanished[:20],
                    )
            if done is None:
                counts.acked = await self.stream.ack(ids)
            else:
                await self._ack_gathered(ids)
                counts.acked = len(ids)
            if self.parked:
                for entry_id in ids:
                    self.parked.pop(entry_id, None)
            with batch.use(None):
                _log.debug(
                    "stream batch committed",
                    origin=batch.origin,
                    read=counts.read,
                    accepted=counts.accepted,
                    duplicates=counts.duplicates,
                    rejected=counts.rejected,
                )
        except BaseException as exc:
            batch.end(error=True, exc=exc)
            raise
        finally:
            if done is not None:
                done.set()
        batch.end()

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
                fallback = dataclasses.replace(fallback, failure_code=FailureCode.INVALID_FIELD.value)
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


def may_commit_together(earlier: Sequence[Outcome], later: Sequence[Outcome]) -> bool:
    """Whether a batch (`later`) may be committed while the one read before it (`earlier`) still
    is. Each command's outcome depends on what was committed before it under its idempotency
    key and under its delivery id, so a later command sharing either with an earlier one must
    wait for it (the earlier command wins a conflict, as in stream order), except an exact
    repeat of the only earlier command under that key and that id: same source, key, delivery
    id and fingerprint is decided the same way whichever of the two the database takes first
    (one delivery, the other its duplicate; the transactions queue on the reservation's row
    lock). Malformed entries depend on nothing."""
    # each key and id of the earlier batch -> its command's identity (None: several differ)
    keys: dict[tuple[str, str], tuple[str, str, str, str] | None] = {}
    ids: dict[str, tuple[str, str, str, str] | None] = {}
    for o in earlier:
        if type(o) is Command:
            ident = (o.source, o.idempotency_key, o.delivery_id, o.fingerprint)
            key = (o.source, o.idempotency_key)
            if keys.get(key, ident) != ident:
                keys[key] = None
            else:
                keys[key] = ident
            if ids.get(o.delivery_id, ident) != ident:
                ids[o.delivery_id] = None
            else:
                ids[o.delivery_id] = ident
    if not keys:
        return True
    missing = ("",)
    for o in later:
        if type(o) is not Command:
            continue
        ident = (o.source, o.idempotency_key, o.delivery_id, o.fingerprint)
        by_key = keys.get((o.source, o.idempotency_key), missing)
        by_id = ids.get(o.delivery_id, missing)
        if by_key is not missing and by_key != ident:
            return False
        if by_id is not missing and by_id != ident:
            return False
    return True


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


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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
