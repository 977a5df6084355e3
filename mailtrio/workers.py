"""The attempt worker pool over a bounded memory channel (CONTRACT §5).

MAIL_ATTEMPT_WORKER_CONCURRENCY workers receive claimed deliveries from the scheduler over an
unbuffered channel; the scheduler claims for idle workers and for a small buffer ahead of them
(about one job per worker, see mailtrio.scheduler), so a worker that finishes takes its next job
at once. A job's lease runs from before its claim, so time spent in that buffer counts against
its send window.

Render once, before anything is sent: right after a claim (in the same unit of work, see
store.claim_batch) the pool's `prepare_claims` renders every delivery not rendered yet (template
mode: the catalog; rendered mode: the payload) and validates it (no empty subject or body, nothing
unsafe in a header); the content and the resolved locale are stored under the lease before the
job is handed to a worker, one statement for the whole batch. A render error fails the delivery
there (`render_failed: ...`) and it never reaches a worker. A delivery claimed again reuses its
stored content.

Each worker owns one provider session (for SMTP: one persistent connection) and runs one attempt
at a time: build the message (the delivery's own Message-ID on every attempt), send it under a
cancel scope, classify, and hand the outcome to the recorder. The recorder writes whatever is
queued at once, in one multi-row statement (group commit): the window between the server's 250
and the durable record stays one commit long while many workers share each round trip. Every
write is fenced on this instance's lease.

No send without time on the lease. The lease's end is known on the local monotonic clock, read
before the claim statement was sent (so it is never later than the database's). An SMTP
transaction's deadline is the earlier of MAIL_SMTP_TIMEOUT and the lease's end minus
LEASE_MARGIN. A worker that finds less than MIN_SEND_SECONDS of that left (the process was
stopped or stalled between claim and send), or finds the instance identity lock lost, gives the
delivery back unsent: due now, no attempt counted. The session asks again right before MAIL FROM
and right before the message content (providers.base: lease check), so a process resumed after
its lease ended never starts either for that delivery.

An attempt's failure stays inside that attempt. Any exception while decoding a claimed row,
rendering, building or sending one delivery is logged once with its traceback (`attempt
crashed`) and ends that attempt only: a deterministic failure (the row cannot be decoded, the
message cannot be built: UnicodeError, RecursionError, a render or content error) fails the
delivery with a status_reason saying why (`decode_failed: ...`, `render_failed: ...`,
`build_failed: ...`); anything else is recorded `transport_failed` and retried on the ladder.

Shutdown: the pool returns once the channel is closed and every in-flight attempt is recorded.
If its cancel scope is cancelled (the shutdown deadline), running attempts are recorded
`interrupted` and their deliveries put back on the schedule at once (shielded, short deadline);
the MAIL_MAX_INTERRUPTED-th interrupted attempt in a row dead-letters the delivery instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailtrio import log, message, retry, shutdown, telemetry
from mailtrio.backoff import Backoff
from mailtrio.catalog import Catalog, RenderError
from mailtrio.config import Settings, format_duration
from mailtrio.enums import DeliveryStatus, PayloadMode
from mailtrio.providers.base import AttemptStatus, Envelope, Phase, Provider, SendReport, Session
from mailtrio.store import Database, TransientError
from mailtrio.store import engine as store

if TYPE_CHECKING:
    from mailtrio.identity import InstanceIdentity

_log = log.get("mailtrio.workers")

# Bound on the shielded clean-up of a cancelled attempt (record it, put it back).
CLEANUP_SECONDS = 1.5
# Bound on one database write of the recorder.
WRITE_TIMEOUT = 15.0
# Outcomes queued beyond this many per worker make workers wait for the recorder.
BACKLOG_PER_WORKER = 4
# An SMTP transaction ends at the latest this long before the lease does (clock-rate drift, the
# outcome's write).
LEASE_MARGIN = 5.0
# A delivery with less than this left of its send window is given back unsent.
MIN_SEND_SECONDS = 1.0
# Failures that the same input would cause again: the delivery fails instead of retrying.
DETERMINISTIC: tuple[type[BaseException], ...] = (UnicodeError, RecursionError, RenderError, message.ContentError)

_propagator = TraceContextTextMapPropagator()
_RETRY_WRITE: tuple[type[BaseException], ...] = (*TransientError, trio.TooSlowError)


@dataclass(frozen=True)
class Job:
    """A claimed, rendered delivery on its way to a worker."""

    claim: store.Claim
    content: message.Content
    addressing: message.Addressing
    # The attempt span, started at the claim (the render span is its child); the worker ends it.
    span: Span
    # trio time right before the claim statement was sent (the lease started after it)
    claimed_at: float = 0.0
    # trio time at which the lease ends (claimed_at + the lease's length)
    lease_end: float = math.inf


def send_window(lease_end: float, now: float, smtp_timeout: float) -> float:
    """Seconds an SMTP transaction started `now` may take: MAIL_SMTP_TIMEOUT, or less when the
    lease (minus LEASE_MARGIN) ends sooner. Below MIN_SEND_SECONDS the delivery is given back."""
    return min(smtp_timeout, lease_end - LEASE_MARGIN - now)


def is_deterministic(exc: BaseException) -> bool:
    """Would the same delivery fail the same way again?"""
    return isinstance(exc, DETERMINISTIC)


def describe(exc: BaseException) -> str:
    """`Type: message` on one line, bounded."""
    return f"{type(exc).__name__}: {_one_line(exc)}"[:500]


# -- rendering --------------------------------------------------------------------------------------


def prepare(
    claim: store.Claim, catalog: Catalog, sender: message.Address
) -> tuple[message.Content, message.Addressing]:
    """The content (rendered now or stored earlier) and addressing of a claimed delivery.

    Raises RenderError or message.ContentError when the delivery cannot be sent as it is.
    """
    payload = claim.payload
    headers_raw = claim.headers if claim.rendered else payload.get("headers")
    if headers_raw is None:
        headers_raw = {}
    if not isinstance(headers_raw, dict):
        raise message.ContentError("headers must be an object")
    headers = {str(k): v for k, v in headers_raw.items()}
    if claim.rendered:
        content = message.Content(
            subject=claim.subject or "",
            text=claim.text_body,
            html=claim.html_body,
            headers=headers,
            locale=claim.resolved_locale or claim.locale,
        )
    elif claim.payload_mode == PayloadMode.TEMPLATE:
        variables = payload.get("variables") or {}
        if not isinstance(variables, dict):
            raise RenderError("variables must be an object")
        if not claim.template_id:
            raise RenderError("no template_id")
        rendered = catalog.render(claim.template_id, claim.locale, variables)
        content = message.Content(
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            headers=headers,
            locale=rendered.resolved_locale,
        )
    else:
        subject, text, html = payload.get("subject"), payload.get("text"), payload.get("html")
        for name, value in (("subject", subject), ("text", text), ("html", html)):
            if value is not None and not isinstance(value, str):
                raise message.ContentError(f"{name} must be a string")
        content = message.Content(
            subject=subject or "",
            text=text if text and text.strip() else None,
            html=html if html and html.strip() else None,
            headers=headers,
            locale=claim.locale,
        )
    content.validate()
    recipients = claim.recipients
    reply_to = payload.get("reply_to")
    addressing = message.Addressing(
        sender=sender,
        to=message.addresses(recipients.get("to")),
        cc=message.addresses(recipients.get("cc")),
        bcc=message.addresses(recipients.get("bcc")),
        reply_to=message.Address.from_value(reply_to) if reply_to else None,
    )
    addressing.validate()
    return content, addressing


@dataclass
class Prepared:
    """What `prepare_claims` made of a claimed batch (written in the claim's transaction)."""

    jobs: list[Job] = field(default_factory=list)
    contents: list[store.ContentWrite] = field(default_factory=list)
    failures: list[store.Finish] = field(default_factory=list)
    stored: set[str] = field(default_factory=set)

    def sendable(self) -> list[Job]:
        """The jobs whose content is stored (a render is never sent before it is durable)."""
        out = []
        for job in self.jobs:
            if job.claim.rendered or job.claim.delivery_id in self.stored:
                out.append(job)
            else:
                job.span.set_status(Status(StatusCode.ERROR, "lease lost before sending"))
                job.span.end()
                _log.warning("claim lost before sending; nothing sent", delivery_id=job.claim.delivery_id)
        return out


# -- the recorder -----------------------------------------------------------------------------------


@dataclass
class _Batch:
    items: list[tuple[store.Finish, Callable[[bool], None] | None]] = field(default_factory=list)
    ok: set[str] = field(default_factory=set)
    failed: bool = False


class Recorder:
    """Attempt outcomes, group-committed and fenced on this instance's lease.

    Whatever is queued is written at once, in one statement, by one task; while a write is in
    flight new outcomes gather for the next one, so many workers share each round trip without any
    added delay. The write itself is shielded from cancellation (a batch whose commit may already
    be on its way is never abandoned), bounded by WRITE_TIMEOUT, which `shorten` cuts down when
    the pool is being cancelled.
    """

    def __init__(self, db: Database, owner: str, *, backlog: int,
                 on_final: Callable[[Sequence[str]], None] | None = None) -> None:
        self.db = db
        self.owner = owner
        self.backlog = backlog
        # Called with the delivery ids of outcomes whose write is over (durable, or given up).
        self.on_final = on_final
        self._pending = _Batch()
        self._wake = trio.Event()
        self._room = trio.Event()
        self._closing = False
        self._inflight: trio.CancelScope | None = None
        self.flushes = 0
        self.written = 0

    async def finish(self, item: store.Finish, after: Callable[[bool], None] | None = None) -> None:
        """Queue an outcome, written at once in the next flush; waits only when backlogged.

        `after(fenced_ok)` runs once the outcome is durable (or known lost).
        """
        while len(self._pending.items) >= self.backlog and not self._closing:
            await self._room.wait()
        self._pending.items.append((item, after))
        self._wake.set()

    async def write_now(self, finishes: Sequence[store.Finish], *, final: bool = True) -> set[str]:
        """Write outcomes directly, outside the queue (claims given back, cancelled attempts).
        `final`: no retry follows, whatever happens (the deliveries are no longer held)."""
        owner = self.owner
        try:
            return await self.db.run(lambda conn: store.finish_attempts(conn, owner=owner, items=finishes))
        finally:
            if final:
                self._final(finishes)

    def _final(self, items: Sequence[store.Finish]) -> None:
        if self.on_final is not None:
            self.on_final([item.delivery_id for item in items])

    def shorten(self, seconds: float) -> None:
        """Bound the write in flight to `seconds` from now: the pool is being cancelled."""
        scope = self._inflight
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + seconds)

    async def close(self) -> None:
        """Stop once everything queued is written."""
        self._closing = True
        self._wake.set()
        self._room.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                if not self._pending.items:
                    if self._closing:
                        return
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                batch, self._pending = self._pending, _Batch()
                self._room.set()
                self._room = trio.Event()
                await self._flush(batch)
        finally:
            # Cancelled at the shutdown deadline: write what is queued, shielded and bounded.
            if self._pending.items:
                with shutdown.shielded(CLEANUP_SECONDS):
                    batch, self._pending = self._pending, _Batch()
                    await self._flush(batch, retry_transient=False)

    async def _write(self, items: list[store.Finish]) -> set[str]:
        # Shielded within WRITE_TIMEOUT, and never past the shutdown deadline's clean-up reserve.
        with shutdown.shielded(WRITE_TIMEOUT) as scope:
            self._inflight = scope
            try:
                return await self.write_now(items, final=False)
            finally:
                self._inflight = None
        raise trio.TooSlowError(f"outcome write did not finish within {WRITE_TIMEOUT:.0f}s")

    async def _write_each(self, items: list[store.Finish]) -> set[str]:
        ok: set[str] = set()
        for item in items:
            try:
                ok |= await self._write([item])
            except Exception as exc:
                _log.error("outcome write failed; its lease will expire and be rescued",
                           delivery_id=item.delivery_id, status=item.status, error=_one_line(exc))
        return ok

    async def _flush(self, batch: _Batch, *, retry_transient: bool = True) -> None:
        items = [item for item, _ in batch.items]
        backoff = Backoff(0.1, 2.0)
        try:
            while True:
                try:
                    batch.ok = await self._write(items)
                    break
                except _RETRY_WRITE as exc:
                    if not retry_transient:
                        raise
                    # The leases still protect these rows; keep trying while the database recovers.
                    delay = backoff.next()
                    _log.warning("outcome write failed, retrying", error=_one_line(exc),
                                 retry_in_s=round(delay, 3), items=len(items))
                    await trio.sleep(delay)
        except trio.Cancelled:
            batch.failed = True
            raise
        except Exception as exc:
            if len(items) > 1 and retry_transient:
                # Not a connection problem: write the outcomes one by one, so that one bad row
                # cannot take the whole batch with it.
                _log.error("outcome batch write failed; writing its outcomes one by one",
                           error=_one_line(exc), items=len(items))
                batch.ok = await self._write_each(items)
            else:
                batch.failed = True
                _log.error("outcome write failed; the leases will expire and be rescued",
                           error=_one_line(exc), items=len(items),
                           delivery_ids=[i.delivery_id for i in items][:20])
        finally:
            self.flushes += 1
            self.written += len(items)
            self._final(items)
            for item, after in batch.items:
                ok = item.delivery_id in batch.ok
                if not ok and not batch.failed:
                    _log.warning("attempt outcome discarded: lease lost", delivery_id=item.delivery_id,
                                 status=item.status)
                if after is not None:
                    after(ok)


# -- the pool -----------------------------------------------------------------------------------------


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: Catalog,
        provider: Provider,
        receive_channel: trio.MemoryReceiveChannel[Job],
        *,
        identity: InstanceIdentity | None = None,
    ) -> None:
        self.settings = settings
        # The instance identity lock: no SMTP transaction starts while it is not known held.
        self.identity = identity
        self.db = db
        self.catalog = catalog
        self.provider = provider
        self.provider_name = getattr(provider, "name", "?")
        self.receive_channel = receive_channel
        self.size = settings.worker_concurrency
        # Deliveries this process holds a claim on and has not recorded an outcome for yet: the
        # lease rescue leaves them to this process, even once their lease expired (it gives them
        # back itself); any other expired lease of its own is rescued like a dead instance's.
        self.held: set[str] = set()
        self.recorder = Recorder(db, settings.instance_id, backlog=BACKLOG_PER_WORKER * self.size,
                                 on_final=self.forget)
        self.sender = message.Address.from_value(settings.smtp_from)
        self._idle = 0
        # Called with the delay (s) of every retry this instance schedules (the scheduler's timer).
        self.on_retry_scheduled: Callable[[float], None] | None = None
        # Called whenever the number of idle workers changes (the scheduler's capacity).
        self.on_idle_change: Callable[[], None] | None = None
        self.attempts = 0
        # deliveries given back unsent (too little lease left), attempts that crashed
        self.released_unsent = 0
        self.crashed = 0

    # -- what the scheduler sees ------------------------------------------------------------------
    @property
    def idle(self) -> int:
        return self._idle

    def forget(self, delivery_ids: Sequence[str]) -> None:
        """These deliveries are no longer held (their outcome is written, or given up)."""
        for delivery_id in delivery_ids:
            self.held.discard(delivery_id)

    def _set_idle(self, delta: int) -> None:
        self._idle += delta
        if self.on_idle_change is not None:
            self.on_idle_change()

    def prepare_claims(
        self,
        claims: Sequence[store.Claim],
        broken: Sequence[store.Undecodable] = (),
        *,
        lease_start: float | None = None,
    ) -> Prepared:
        """Render (or load) the content of claimed deliveries, between the claim statement and
        the content write (store.claim_batch). Synchronous and pure CPU. `lease_start`: the trio
        time read before the claim statement was sent. Each delivery is prepared on its own: an
        exception fails (or retries) that delivery alone, never the batch."""
        out = Prepared()
        claimed_at = trio.current_time() if lease_start is None else lease_start
        lease_end = claimed_at + self.settings.lease_seconds
        for bad in broken:
            out.failures.append(self._undecodable(bad))
        for claim in claims:
            try:
                job, write = self._prepare_one(claim, claimed_at, lease_end, out)
            except Exception as exc:
                out.failures.append(self._prepare_crashed(claim, exc))
                continue
            if job is None:
                continue
            if write is not None:
                out.contents.append(write)
            out.jobs.append(job)
        return out

    def _prepare_one(
        self, claim: store.Claim, claimed_at: float, lease_end: float, out: Prepared
    ) -> tuple[Job | None, store.ContentWrite | None]:
        span = telemetry.tracer.start_span(
            "attempt",
            links=_producer_links(claim.traceparent),
            attributes={
                "mail.delivery_id": claim.delivery_id,
                "mail.source": claim.source,
                "mail.attempt_no": claim.attempt_count + 1,
            },
        )
        try:
            # Child spans are started and ended explicitly (no context switch: nothing logs inside).
            # A span not recorded (no exporter: ids only, see telemetry) has children that no
            # sampler would record either (they share its trace id and parent): none is made.
            render_span = None if claim.rendered or not span.is_recording() else telemetry.tracer.start_span(
                "render", context=trace.set_span_in_context(span),
                attributes={"mail.template_id": claim.template_id or "", "mail.locale": claim.locale},
            )
            try:
                content, addressing = prepare(claim, self.catalog, self.sender)
            except (RenderError, message.ContentError) as exc:
                if render_span is not None:
                    render_span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                    render_span.end()
                out.failures.append(self._render_failed(claim, str(exc), span))
                return None, None
            except BaseException as exc:
                if render_span is not None:
                    render_span.set_status(Status(StatusCode.ERROR, describe(exc)[:200]))
                    render_span.end()
                raise
            if render_span is not None:
                render_span.set_attribute("mail.resolved_locale", content.locale)
                render_span.end()
            write = None
            if not claim.rendered:
                write = store.ContentWrite(
                    delivery_id=claim.delivery_id,
                    lease_started_at=claim.lease_started_at,
                    subject=content.subject,
                    text_body=content.text,
                    html_body=content.html,
                    headers=dict(content.headers),
                    resolved_locale=content.locale,
                )
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, describe(exc)[:200]))
            span.end()
            raise
        return Job(claim, content, addressing, span, claimed_at, lease_end), write

    def _undecodable(self, bad: store.Undecodable) -> store.Finish:
        """A claimed row that cannot be decoded: it fails alone."""
        reason = f"decode_failed: the stored delivery cannot be decoded: {describe(bad.error)}"[:1000]
        _log.error("attempt crashed", delivery_id=bad.delivery_id, source=bad.source, phase="decode",
                   delivery_status=DeliveryStatus.FAILED, error=describe(bad.error), exc_info=bad.error)
        return failed_unsent(bad, reason)

    def _prepare_crashed(self, claim: store.Claim, exc: Exception) -> store.Finish:
        """Rendering a claimed delivery raised something other than a render error."""
        if is_deterministic(exc):
            reason = f"render_failed: {describe(exc)}"[:1000]
            _log.error("attempt crashed", delivery_id=claim.delivery_id, source=claim.source, phase="render",
                       delivery_status=DeliveryStatus.FAILED, error=describe(exc), exc_info=exc)
            return failed_unsent(claim, reason)
        report = _crash_report(exc, Phase.BUILD, "render")
        finish = self._finish_for(claim, report, elapsed_ms=0, resolved_locale=None)
        _log.error("attempt crashed", delivery_id=claim.delivery_id, source=claim.source, phase="render",
                   delivery_status=finish.status, error=describe(exc), exc_info=exc)
        return finish

    def _render_failed(self, claim: store.Claim, reason: str, span: Span) -> store.Finish:
        summary = f"render_failed: {reason}"[:1000]
        span.set_status(Status(StatusCode.ERROR, summary))
        span.end()
        with trace.use_span(span):
            _log.warning("delivery failed: render failed", delivery_id=claim.delivery_id,
                         source=claim.source, template_id=claim.template_id, reason=reason)
        return failed_unsent(claim, summary)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the channel is closed and every in-flight attempt has been recorded."""
        try:
            async with self.receive_channel, trio.open_nursery() as outer:
                await outer.start(self.recorder.run)
                try:
                    async with trio.open_nursery() as workers:
                        for i in range(self.size):
                            workers.start_soon(self._worker, name=f"attempt-worker-{i}")
                        _log.info("attempt worker pool started", workers=self.size, provider=self.provider_name)
                        task_status.started()
                finally:
                    await self.recorder.close()
        finally:
            _log.info("attempt workers stopped", attempts=self.attempts)

    async def _worker(self) -> None:
        session = self.provider.session()
        try:
            while True:
                self._set_idle(+1)
                try:
                    job = await self.receive_channel.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                finally:
                    self._set_idle(-1)
                try:
                    await self._attempt(session, job)
                except Exception as exc:
                    # Never reached in practice (_attempt contains its own failures); if it were,
                    # this worker goes on and the delivery's lease expires and is rescued.
                    _log.error("attempt crashed", delivery_id=job.claim.delivery_id, phase="record",
                               error=describe(exc), exc_info=exc)
                    with trio.move_on_after(2.0):
                        await session.abort()
        finally:
            # QUIT politely, but never past the pool's own deadline (a cancelled close aborts).
            with trio.move_on_after(2.0):
                await session.close()

    # -- one attempt ----------------------------------------------------------------------------------
    def _lease_ok(self, job: Job) -> bool:
        """The lease check (providers.base): time left before the lease's end minus the margin,
        and the identity lock held."""
        if self.identity is not None and not self.identity.holds():
            return False
        return trio.current_time() < job.lease_end - LEASE_MARGIN

    async def _attempt(self, session: Session, job: Job) -> None:
        self.attempts += 1
        with trace.use_span(job.span, end_on_exit=True):
            try:
                report = await self._build_and_send(session, job)
            except trio.Cancelled:
                self.recorder.shorten(CLEANUP_SECONDS)
                await self._cancelled(session, job)
                raise
            if report is None:
                return
            if report.released:
                await self._release_unsent(job, report.summary)
                return
            await self._record(job, report)

    async def _build_and_send(self, session: Session, job: Job) -> SendReport | None:
        """The attempt up to the provider's report; None when it ended otherwise (given back,
        or failed for good before sending)."""
        claim = job.claim
        window = send_window(job.lease_end, trio.current_time(), self.settings.smtp_timeout)
        if window < MIN_SEND_SECONDS or (self.identity is not None and not self.identity.holds()):
            left = job.lease_end - trio.current_time()
            why = ("the instance identity lock is lost" if window >= MIN_SEND_SECONDS
                   else f"the lease had {left:.1f}s left" if left > 0 else f"the lease ended {-left:.1f}s ago")
            await self._release_unsent(job, f"not sent: {why}")
            return None
        try:
            addressing = job.addressing
            data = await build_message(addressing, job.content, claim.message_id)
            recipients = envelope_recipients(addressing)
            # A retry goes only to the recipients not yet accepted nor refused for good.
            targets = retry.pending_recipients(list(recipients), retry.outcomes_by_email(claim.recipient_outcomes))
            wire = [recipients[e] for e in targets]
            envelope = Envelope(
                sender=addressing.envelope_sender(),
                recipients=wire,
                source=claim.source,
                delivery_id=claim.delivery_id,
                message_id=claim.message_id,
                smtputf8=addressing.needs_smtputf8(list(recipients.values())),
                lease_ok=lambda: self._lease_ok(job),
            )
        except Exception as exc:
            await self._crashed(job, exc, "build")
            return None
        if not wire:
            return SendReport(AttemptStatus.PROVIDER_ACCEPTED, "every recipient was accepted earlier; nothing sent",
                              Phase.STUB)
        try:
            return await self._send(session, envelope, data, window)
        except Exception as exc:
            # The session's state is unknown: start the next attempt on a new connection.
            with trio.move_on_after(2.0):
                await session.abort()
            report = await self._crashed(job, exc, "send")
            return report

    async def _crashed(self, job: Job, exc: Exception, stage: str) -> SendReport | None:
        """An exception ended this attempt (and nothing else): log it once with its traceback;
        a deterministic failure fails the delivery (None), anything else becomes a
        `transport_failed` report, retried on the ladder."""
        claim = job.claim
        self.crashed += 1
        job.span.set_status(Status(StatusCode.ERROR, describe(exc)[:200]))
        if not is_deterministic(exc):
            _log.error("attempt crashed", delivery_id=claim.delivery_id, source=claim.source, phase=stage,
                       delivery_status="retried on the ladder", error=describe(exc), exc_info=exc)
            return _crash_report(exc, Phase.BUILD if stage == "build" else Phase.MESSAGE, stage)
        reason = f"{stage}_failed: the message cannot be {'built' if stage == 'build' else 'sent'}: {describe(exc)}"
        _log.error("attempt crashed", delivery_id=claim.delivery_id, source=claim.source, phase=stage,
                   delivery_status=DeliveryStatus.FAILED, error=describe(exc), exc_info=exc)
        finish = store.Finish(
            delivery_id=claim.delivery_id,
            lease_started_at=claim.lease_started_at,
            status=DeliveryStatus.FAILED,
            status_reason=reason[:1000],
            attempt_status=None,
            elapsed_ms=_elapsed_ms(job),
            provider_summary=None,
            details=None,
            retry_ms=None,
            ladder_step=claim.ladder_step,
            resolved_locale=job.content.locale,
        )
        job.span.set_attribute("mail.delivery_status", str(DeliveryStatus.FAILED))
        await self.recorder.finish(finish)
        return None

    async def _release_unsent(self, job: Job, why: str) -> None:
        """Give the delivery back unsent (no attempt counted): due now, for whoever claims next."""
        claim = job.claim
        self.released_unsent += 1
        job.span.set_attribute("mail.given_back", True)
        _log.warning("delivery given back unsent", delivery_id=claim.delivery_id, source=claim.source,
                     reason=why, lease_left_s=round(job.lease_end - trio.current_time(), 3),
                     identity_held=self.identity is None or self.identity.holds())
        await self.recorder.finish(release(claim, job.content.locale))

    def _send_attributes(self, recipients: int) -> dict[str, str | int]:
        """The CLIENT span's attributes: the peer as OpenTelemetry names it (server.address/port)."""
        attributes: dict[str, str | int] = {"mail.recipients": recipients, "mail.provider": self.provider_name}
        if self.provider_name == "smtp" and self.settings.smtp_host and self.settings.smtp_port:
            attributes["server.address"] = self.settings.smtp_host
            attributes["server.port"] = self.settings.smtp_port
        return attributes

    async def _send(self, session: Session, envelope: Envelope, data: bytes, window: float | None = None) -> SendReport:
        timeout = self.settings.smtp_timeout
        bound = timeout if window is None else min(timeout, window)
        start = trio.current_time()
        # Under the attempt's span (see _attempt); when that is not recorded, neither is this.
        span = telemetry.tracer.start_span(
            "smtp send", kind=SpanKind.CLIENT, attributes=self._send_attributes(len(envelope.recipients)),
        ) if trace.get_current_span().is_recording() else trace.INVALID_SPAN
        try:
            with trio.move_on_after(bound) as scope:
                report = await session.send(envelope, data)
            if scope.cancelled_caught:
                await session.abort()
                if bound < timeout:
                    summary = (f"timed out after {format_duration(bound)}: the lease's end came first "
                               f"(MAIL_SMTP_TIMEOUT {format_duration(timeout)})")
                else:
                    summary = f"timed out after {format_duration(timeout)} (MAIL_SMTP_TIMEOUT)"
                phase, handed_over = session.phase, session.handed_over
                extra: dict[str, object] = {"timeout_s": round(bound, 3)}
                if handed_over:
                    # RFC 1047: the message was written, its reply did not come in time. The
                    # server may have accepted it; the retry may deliver it a second time.
                    summary += " waiting for the reply to the message; the server may have accepted it"
                    extra["handed_over"] = True
                report = SendReport(
                    AttemptStatus.TIMED_OUT,
                    summary,
                    phase,
                    handed_over=handed_over,
                    extra=extra,
                )
            elapsed_ms = (trio.current_time() - start) * 1000.0
            telemetry.send_duration_ms.record(elapsed_ms, {"provider": self.provider_name})
            span.set_attribute("mail.attempt_status", str(report.status))
            if report.status != AttemptStatus.PROVIDER_ACCEPTED:
                span.set_status(Status(StatusCode.ERROR, report.summary))
            return report
        finally:
            span.end()

    def _finish_for(
        self, claim: store.Claim, report: SendReport, *, elapsed_ms: int, resolved_locale: str | None
    ) -> store.Finish:
        """The outcome of an attempt that ended with `report`, with its step on the ladder."""
        return self._settle(claim, report, elapsed_ms=elapsed_ms, resolved_locale=resolved_locale)[0]

    def _settle(
        self,
        claim: store.Claim,
        report: SendReport,
        *,
        elapsed_ms: int,
        resolved_locale: str | None,
        recipients: Sequence[str] | None = None,
    ) -> tuple[store.Finish, retry.Step]:
        """The outcome of an attempt to the recipients still pending (retry.settle: per recipient
        when there are several) and the delivery's step on the ladder."""
        prior = retry.outcomes_by_email(claim.recipient_outcomes)
        if recipients is None:
            recipients = claim_recipients(claim)
        settled = retry.settle(
            report,
            recipients=recipients,
            targets=retry.pending_recipients(recipients, prior),
            prior=prior,
            attempt_no=claim.attempt_count + 1,
            ladder_step=claim.ladder_step,
            ladder=self.settings.retry_ladder,
        )
        step = settled.step
        retry_ms = None if step.retry_delay is None else round(step.retry_delay * 1000)
        finish = store.Finish(
            delivery_id=claim.delivery_id,
            lease_started_at=claim.lease_started_at,
            status=step.delivery_status,
            status_reason=settled.status_reason,
            attempt_status=str(report.status),
            elapsed_ms=elapsed_ms,
            provider_summary=report.summary,
            details=report.details(),
            retry_ms=retry_ms,
            ladder_step=step.ladder_step,
            dead_reason=settled.dead_reason,
            resolved_locale=resolved_locale,
            recipient_outcomes=None if settled.outcomes is None else [o.as_json() for o in settled.outcomes],
        )
        return finish, step

    async def _record(self, job: Job, report: SendReport) -> None:
        claim = job.claim
        attempt_no = claim.attempt_count + 1
        finish, step = self._settle(claim, report, elapsed_ms=_elapsed_ms(job), resolved_locale=job.content.locale,
                                    recipients=list(envelope_recipients(job.addressing)))
        if report.extra.get("crashed"):
            job.span.set_attribute("mail.crashed", str(report.extra["crashed"]))
        job.span.set_attribute("mail.attempt_status", str(report.status))
        job.span.set_attribute("mail.delivery_status", step.delivery_status)
        fields = {
            "delivery_id": claim.delivery_id,
            "source": claim.source,
            "attempt_no": attempt_no,
            "attempt_status": str(report.status),
            "provider_summary": report.summary,
        }
        if step.delivery_status == DeliveryStatus.SENT:
            _log.debug("delivery sent", **fields)
        elif step.delivery_status == DeliveryStatus.RENDERED:
            _log.info("attempt failed, retry scheduled", retry_in_s=step.retry_delay,
                      ladder_step=step.ladder_step, **fields)
        elif step.dead_letter:
            _log.warning("delivery dead-lettered: retry ladder exhausted", **fields)
        elif step.delivery_status == DeliveryStatus.SUPPRESSED:
            _log.info("delivery suppressed", **fields)
        else:
            _log.warning("delivery failed", **fields)

        status = str(report.status)
        delivery_status = step.delivery_status
        delay = step.retry_delay

        def after(ok: bool) -> None:
            if not ok:
                return
            telemetry.attempt_outcomes.add(1, {"status": status})
            if delivery_status == DeliveryStatus.DEAD_LETTER:
                telemetry.dead_letters.add(1)
            elif delivery_status == DeliveryStatus.SUPPRESSED:
                telemetry.suppressed.add(1)
            if delay is not None and self.on_retry_scheduled is not None:
                self.on_retry_scheduled(delay)

        try:
            await self.recorder.finish(finish, after)
        except trio.Cancelled:
            # Cancelled while the recorder was backlogged: the server has answered, so write this
            # outcome now rather than leave it to lease expiry (which would resend the message).
            with shutdown.shielded(CLEANUP_SECONDS):
                try:
                    after(claim.delivery_id in await self.recorder.write_now([finish]))
                except Exception as exc:
                    _log.error("could not record an outcome at shutdown; its lease will expire",
                               delivery_id=claim.delivery_id, error=_one_line(exc))
            raise

    async def _cancelled(self, session: Session, job: Job) -> None:
        """The attempt was cancelled (shutdown deadline): record it and put the delivery back,
        or dead-letter it when this is its MAIL_MAX_INTERRUPTED-th interrupted attempt in a row."""
        claim = job.claim
        with shutdown.shielded(CLEANUP_SECONDS) as scope:
            await session.abort()
            finish = interrupted_finish(claim, self.settings.max_interrupted, elapsed_ms=_elapsed_ms(job),
                                        resolved_locale=job.content.locale)
            try:
                done = await self.recorder.write_now([finish])
            except Exception as exc:
                _log.error("could not put a cancelled attempt back; its lease will expire",
                           delivery_id=claim.delivery_id, error=_one_line(exc))
                return
            if claim.delivery_id in done:
                telemetry.attempt_outcomes.add(1, {"status": str(AttemptStatus.INTERRUPTED)})
                if finish.status == DeliveryStatus.DEAD_LETTER:
                    telemetry.dead_letters.add(1)
                    _log.warning("delivery dead-lettered: repeatedly interrupted", delivery_id=claim.delivery_id,
                                 interrupted=claim.interrupted_streak + 1)
                else:
                    _log.info("attempt interrupted by shutdown; delivery back on the schedule",
                              delivery_id=claim.delivery_id)
        if scope.cancelled_caught:
            _log.error("putting a cancelled attempt back timed out; its lease will expire",
                       delivery_id=claim.delivery_id)


def envelope_recipients(addressing: message.Addressing) -> dict[str, str]:
    """To, Cc and Bcc addresses, each once (case-insensitively), in that order: the address as
    the command gave it (the key of its recipient outcome) to its envelope form."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for addr in (*addressing.to, *addressing.cc, *addressing.bcc):
        wire = message.wire_address(addr.email)
        key = wire.lower()  # as Addressing.envelope_recipients: one RCPT per envelope address
        if key not in seen:
            seen.add(key)
            out[addr.email] = wire
    return out


def claim_recipients(claim: store.Claim) -> list[str]:
    """The envelope addresses of a claimed delivery, read from its stored recipients (for an
    outcome recorded without the prepared addressing: a crash before sending)."""
    out: list[str] = []
    seen: set[str] = set()
    for part in ("to", "cc", "bcc"):
        values = claim.recipients.get(part) or ()
        for value in values if isinstance(values, list) else ():
            try:
                email = message.Address.from_value(value).email
                key = message.wire_address(email).lower()
            except (message.ContentError, ValueError):
                continue
            if email and key not in seen:
                seen.add(key)
                out.append(email)
    return out


async def build_message(addressing: message.Addressing, content: message.Content, message_id: str) -> bytes:
    """`message.build`, in a worker thread when the content is large (encoding megabytes takes
    tens of milliseconds, which the event loop must not wait for); inline otherwise."""
    date = datetime.now(UTC)
    if message.content_octets(content) <= message.OFF_LOOP_OCTETS:
        return message.build(addressing, content, message_id=message_id, date=date)
    return await trio.to_thread.run_sync(
        functools.partial(message.build, addressing, content, message_id=message_id, date=date)
    )


def repeatedly_interrupted(count: int) -> str:
    """The status_reason and dead-letter reason of a delivery interrupted `count` times in a row
    (the same text as engine.sql's rescue_leases)."""
    return f"repeatedly interrupted: {count} consecutive attempts interrupted, outcome unknown"


def interrupted_finish(
    claim: store.Claim, max_interrupted: int, *, elapsed_ms: int, resolved_locale: str | None
) -> store.Finish:
    """An attempt cut short at the shutdown deadline: back on the schedule due now, or
    dead-lettered when it makes `max_interrupted` interrupted attempts in a row."""
    streak = claim.interrupted_streak + 1
    dead = streak >= max_interrupted
    reason = repeatedly_interrupted(streak) if dead else "interrupted: the instance stopped mid-attempt"
    return store.Finish(
        delivery_id=claim.delivery_id,
        lease_started_at=claim.lease_started_at,
        status=DeliveryStatus.DEAD_LETTER if dead else DeliveryStatus.RENDERED,
        status_reason=reason,
        attempt_status=str(AttemptStatus.INTERRUPTED),
        elapsed_ms=elapsed_ms,
        provider_summary="interrupted: shutdown deadline reached, outcome unknown",
        details={"phase": "shutdown"},
        retry_ms=None if dead else 0,
        ladder_step=claim.ladder_step,
        dead_reason=reason if dead else None,
        resolved_locale=resolved_locale,
    )


def _crash_report(exc: BaseException, phase: Phase, stage: str) -> SendReport:
    """An attempt that crashed for a reason that may not recur: `transport_failed`, retried."""
    unknown = ", outcome unknown" if stage == "send" else ""
    return SendReport(
        AttemptStatus.TRANSPORT_FAILED,
        f"attempt crashed during {stage}{unknown}: {describe(exc)}"[:1000],
        phase,
        extra={"crashed": type(exc).__name__},
    )


def failed_unsent(claim: store.Claim | store.Undecodable, reason: str) -> store.Finish:
    """The delivery fails before anything was sent (no attempt took place)."""
    return store.Finish(
        delivery_id=claim.delivery_id,
        lease_started_at=claim.lease_started_at,
        status=DeliveryStatus.FAILED,
        status_reason=reason,
        attempt_status=None,
        elapsed_ms=0,
        provider_summary=None,
        details=None,
        retry_ms=None,
        ladder_step=claim.ladder_step,
    )


def release(claim: store.Claim, resolved_locale: str | None = None) -> store.Finish:
    """Give a claim back untouched (no attempt took place): due now, schedule age kept."""
    return store.Finish(
        delivery_id=claim.delivery_id,
        lease_started_at=claim.lease_started_at,
        status=DeliveryStatus.RENDERED,
        status_reason=None,
        attempt_status=None,
        elapsed_ms=0,
        provider_summary=None,
        details=None,
        retry_ms=0,
        ladder_step=claim.ladder_step,
        reenter=False,
        keep_reason=True,
        resolved_locale=resolved_locale,
    )


def _producer_links(traceparent: str | None) -> list[Link]:
    return list(_links_of(traceparent)) if traceparent else []


@functools.lru_cache(maxsize=256)
def _links_of(traceparent: str) -> tuple[Link, ...]:
    """The link to the producer's span. Commands without a traceparent of their own carry their
    intake batch's (up to MAX_BATCH of them share one), so the parse is kept for a while."""
    ctx = _propagator.extract({"traceparent": traceparent})
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return (Link(span_ctx),) if span_ctx.is_valid else ()


def _elapsed_ms(job: Job) -> int:
    return max(0, int((trio.current_time() - job.claimed_at) * 1000))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
