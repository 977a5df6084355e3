"""Pure outcome logic (CONTRACT §5): SMTP replies -> attempt status, attempt status -> next step.

- 2xx after DATA: `provider_accepted`, the delivery is `sent`.
- 5xx: `provider_rejected`; the delivery is `suppressed` when the reply text matches `(?i)suppress`,
  otherwise `failed`. No retry.
- 4xx, and 552 in reply to RCPT (RFC 5321 §4.5.3.1.10): `provider_deferred`.
- Connection, TLS, AUTH or protocol errors: `transport_failed`; MAIL_SMTP_TIMEOUT: `timed_out`.
- Those three are retried on the ladder: a failure at ladder step k waits ladder[k] and moves to
  step k + 1; a retryable failure once every step is used dead-letters the delivery.

Per recipient (`settle`): each envelope recipient has its own outcome, `accepted` (its RCPT and the
message were accepted), `deferred` (4xx, 552 on RCPT, or the whole attempt failed in a retryable
way), `rejected` / `suppressed` (5xx) or, once the ladder ran out while it was still deferred,
`dead_letter`. A retry goes to the deferred recipients only, with the same message: an accepted
recipient never gets it twice. The delivery is final when every recipient is: `sent` when at least
one was accepted (the status_reason names the refused ones), `failed` (or `suppressed`, when every
refusal is a suppression) when none was, `dead_letter` when the ladder ran out for those still
deferred.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailtrio.enums import DeliveryStatus, RecipientStatus
from mailtrio.providers.base import AttemptStatus, Phase, RecipientReply, Reply, SendReport

SUPPRESS_RE = re.compile(r"(?i)suppress")

RETRYABLE = frozenset(
    {AttemptStatus.PROVIDER_DEFERRED, AttemptStatus.TRANSPORT_FAILED, AttemptStatus.TIMED_OUT}
)


def classify_reply(reply: Reply, phase: Phase) -> AttemptStatus:
    """The attempt status a server reply implies (2xx/3xx: accepted so far)."""
    code = reply.code
    if 200 <= code < 400:
        return AttemptStatus.PROVIDER_ACCEPTED
    if code == 552 and phase == Phase.RCPT:
        return AttemptStatus.PROVIDER_DEFERRED
    if 400 <= code < 500:
        return AttemptStatus.PROVIDER_DEFERRED
    if 500 <= code < 600:
        return AttemptStatus.PROVIDER_REJECTED
    return AttemptStatus.TRANSPORT_FAILED


def is_suppression(reply: Reply) -> bool:
    return bool(SUPPRESS_RE.search(reply.text))


@dataclass(frozen=True)
class Refusal:
    """Why a transaction stopped before the message was accepted."""

    status: AttemptStatus
    reply: Reply
    suppressed: bool


def classify_refusal(reply: Reply, phase: Phase) -> Refusal:
    """A non-success reply to MAIL, DATA or the message itself."""
    status = classify_reply(reply, phase)
    if status == AttemptStatus.PROVIDER_ACCEPTED:
        # A 2xx/3xx where the protocol expects something else is a protocol error.
        status = AttemptStatus.TRANSPORT_FAILED
    suppressed = status == AttemptStatus.PROVIDER_REJECTED and is_suppression(reply)
    return Refusal(status, reply, suppressed)


def rcpt_accepted(reply: Reply) -> bool:
    return reply.code in (250, 251)


def classify_recipients(replies: Sequence[RecipientReply]) -> Refusal | None:
    """None when at least one recipient was accepted (the transaction goes on to DATA).

    When every recipient was refused: any temporary refusal (4xx, 552) makes the attempt
    `provider_deferred` (a retry may succeed); otherwise it is `provider_rejected`, and the
    delivery counts as suppressed only when every refusal is a suppression.
    """
    if not replies or any(rcpt_accepted(r.reply) for r in replies):
        return None
    statuses = [classify_reply(r.reply, Phase.RCPT) for r in replies]
    for r, status in zip(replies, statuses, strict=True):
        if status == AttemptStatus.PROVIDER_DEFERRED:
            return Refusal(status, r.reply, False)
    for r, status in zip(replies, statuses, strict=True):
        if status != AttemptStatus.PROVIDER_REJECTED:
            return Refusal(AttemptStatus.TRANSPORT_FAILED, r.reply, False)
    suppressed = all(is_suppression(r.reply) for r in replies)
    deciding = replies[0].reply
    if not suppressed:
        deciding = next(r.reply for r in replies if not is_suppression(r.reply))
    return Refusal(AttemptStatus.PROVIDER_REJECTED, deciding, suppressed)


@dataclass(frozen=True)
class Step:
    """What happens to the delivery after an attempt."""

    delivery_status: str
    retry_delay: float | None
    ladder_step: int
    dead_letter: bool = False


def next_step(
    status: AttemptStatus, *, suppressed: bool, ladder_step: int, ladder: Sequence[float]
) -> Step:
    """The delivery's next state after an attempt ended with `status` at `ladder_step`."""
    if status == AttemptStatus.PROVIDER_ACCEPTED:
        return Step(DeliveryStatus.SENT, None, ladder_step)
    if status == AttemptStatus.SUPPRESSED:
        return Step(DeliveryStatus.SUPPRESSED, None, ladder_step)
    if status == AttemptStatus.PROVIDER_REJECTED:
        return Step(DeliveryStatus.SUPPRESSED if suppressed else DeliveryStatus.FAILED, None, ladder_step)
    if status in RETRYABLE:
        if ladder_step < len(ladder):
            return Step(DeliveryStatus.RENDERED, float(ladder[ladder_step]), ladder_step + 1)
        return Step(DeliveryStatus.DEAD_LETTER, None, ladder_step, dead_letter=True)
    raise ValueError(f"no ladder step for attempt status {status!r}")


def dead_letter_reason(attempts: int, summary: str) -> str:
    noun = "attempt" if attempts == 1 else "attempts"
    return f"retry ladder exhausted after {attempts} {noun}: {summary}"


# -- per-recipient outcomes ---------------------------------------------------------------------

# The statuses are mailtrio.enums.RecipientStatus (`pending` is never stored: the API shows it for
# a recipient not tried yet).
_REFUSED = (RecipientStatus.REJECTED, RecipientStatus.SUPPRESSED)
MAX_REASON = 1000


@dataclass(frozen=True)
class RecipientOutcome:
    """One envelope recipient's outcome: its address as the command gave it, its status, the
    last reply that concerned it and the attempt that gave it."""

    email: str
    status: str
    reply: str | None
    attempt_no: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"email": self.email, "status": self.status, "reply": self.reply, "attempt_no": self.attempt_no}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RecipientOutcome:
        return cls(str(value.get("email") or ""), str(value.get("status") or RecipientStatus.DEFERRED),
                   value.get("reply"), value.get("attempt_no"))


def outcomes_by_email(stored: Iterable[Mapping[str, Any]] | None) -> dict[str, RecipientOutcome]:
    """Stored outcomes (the deliveries.recipient_outcomes column) by lower-cased address."""
    out: dict[str, RecipientOutcome] = {}
    for value in stored or ():
        if isinstance(value, Mapping):
            outcome = RecipientOutcome.from_json(value)
            out[outcome.email.lower()] = outcome
    return out


def pending_recipients(emails: Sequence[str], prior: Mapping[str, RecipientOutcome]) -> list[str]:
    """The recipients an attempt sends to: all but those already accepted or refused for good."""
    if not prior:
        return list(emails)
    out = []
    for email in emails:
        outcome = prior.get(email.lower())
        if outcome is None or outcome.status in (RecipientStatus.DEFERRED, RecipientStatus.DEAD_LETTER):
            out.append(email)
    if not out:
        # Every recipient final while the delivery is not (an operator's retry of a delivery
        # whose refusals were kept): try again those not accepted.
        out = [e for e in emails if (o := prior.get(e.lower())) is None or o.status != RecipientStatus.ACCEPTED]
    return out


def _status_of(status: AttemptStatus, *, suppressed: bool) -> RecipientStatus:
    if status == AttemptStatus.PROVIDER_ACCEPTED:
        return RecipientStatus.ACCEPTED
    if status == AttemptStatus.SUPPRESSED:
        return RecipientStatus.SUPPRESSED
    if status == AttemptStatus.PROVIDER_REJECTED:
        return RecipientStatus.SUPPRESSED if suppressed else RecipientStatus.REJECTED
    return RecipientStatus.DEFERRED


def attempt_results(report: SendReport, targets: Sequence[str], attempt_no: int) -> list[RecipientOutcome]:
    """What one attempt did for each of its recipients (`targets`, in envelope order).

    With RCPT replies: a refused RCPT is deferred (4xx, 552) or refused (5xx) on its own reply; an
    accepted RCPT shares the fate of the message (its final reply, or the DATA refusal). Without
    them (the transaction stopped before RCPT, or the stub) every recipient shares the attempt's.
    """
    replies = report.recipients
    whole = _status_of(report.status, suppressed=report.suppressed)
    if not replies or len(replies) != len(targets):
        return [RecipientOutcome(email, whole, report.summary, attempt_no) for email in targets]
    message_reply = report.reply.summary() if report.reply is not None else report.summary
    if whole != RecipientStatus.ACCEPTED:
        message_reply = report.summary
    out = []
    for email, rr in zip(targets, replies, strict=True):
        reply = rr.reply
        if rcpt_accepted(reply):
            out.append(RecipientOutcome(email, whole, message_reply, attempt_no))
            continue
        status = classify_reply(reply, Phase.RCPT)
        if status == AttemptStatus.PROVIDER_REJECTED:
            rcpt_status = RecipientStatus.SUPPRESSED if is_suppression(reply) else RecipientStatus.REJECTED
        else:
            rcpt_status = RecipientStatus.DEFERRED
        out.append(RecipientOutcome(email, rcpt_status, reply.summary(), attempt_no))
    return out


@dataclass(frozen=True)
class Settlement:
    """The delivery's next step after an attempt, with its reasons and the per-recipient outcomes
    to store (None: nothing to store, as for every delivery with one recipient)."""

    step: Step
    status_reason: str | None
    dead_reason: str | None
    outcomes: list[RecipientOutcome] | None


def settle(
    report: SendReport,
    *,
    recipients: Sequence[str],
    targets: Sequence[str],
    prior: Mapping[str, RecipientOutcome],
    attempt_no: int,
    ladder_step: int,
    ladder: Sequence[float],
) -> Settlement:
    """The delivery's next state once an attempt to `targets` (the pending part of `recipients`,
    the whole envelope in command order) ended with `report`."""
    if not prior and len(recipients) == 1:
        # One recipient: the delivery's own status and reason say it all, nothing is stored.
        if report.status is AttemptStatus.PROVIDER_ACCEPTED:
            return _sent_at_once(ladder_step)
        step = next_step(report.status, suppressed=report.suppressed, ladder_step=ladder_step, ladder=ladder)
        dead = dead_letter_reason(attempt_no, report.summary) if step.dead_letter else None
        return Settlement(step, report.summary, dead, None)
    merged = dict(prior)
    for outcome in attempt_results(report, targets, attempt_no):
        merged[outcome.email.lower()] = outcome
    outcomes = [merged.get(e.lower()) or RecipientOutcome(e, RecipientStatus.DEFERRED, None, None) for e in recipients]
    deferred = [o for o in outcomes if o.status in (RecipientStatus.DEFERRED, RecipientStatus.DEAD_LETTER)]
    accepted = [o for o in outcomes if o.status == RecipientStatus.ACCEPTED]
    if deferred:
        if ladder_step < len(ladder):
            step = Step(DeliveryStatus.RENDERED, float(ladder[ladder_step]), ladder_step + 1)
            reason = recipients_reason(outcomes)
            return Settlement(step, reason, None, outcomes)
        outcomes = [RecipientOutcome(o.email, RecipientStatus.DEAD_LETTER, o.reply, o.attempt_no)
                    if o.status == RecipientStatus.DEFERRED else o for o in outcomes]
        reason = recipients_reason(outcomes)
        step = Step(DeliveryStatus.DEAD_LETTER, None, ladder_step, dead_letter=True)
        return Settlement(step, reason, dead_letter_reason(attempt_no, reason), outcomes)
    if accepted:
        refused = len(accepted) < len(outcomes)
        step = Step(DeliveryStatus.SENT, None, ladder_step)
        return Settlement(step, recipients_reason(outcomes) if refused else None, None, outcomes)
    suppressed = all(o.status == RecipientStatus.SUPPRESSED for o in outcomes)
    step = Step(DeliveryStatus.SUPPRESSED if suppressed else DeliveryStatus.FAILED, None, ladder_step)
    return Settlement(step, recipients_reason(outcomes), None, outcomes)


@functools.lru_cache(maxsize=64)
def _sent_at_once(ladder_step: int) -> Settlement:
    """The common case (one recipient, accepted): nothing to store. Settlements are immutable,
    so one per ladder step is shared (this runs for nearly every delivery)."""
    return Settlement(Step(DeliveryStatus.SENT, None, ladder_step), None, None, None)


def recipients_reason(outcomes: Sequence[RecipientOutcome]) -> str:
    """A short status_reason naming the recipients that were not accepted, with their replies.

    When no recipient was accepted and every one got the same reply, that reply alone (as for a
    delivery with one recipient)."""
    accepted = sum(1 for o in outcomes if o.status == RecipientStatus.ACCEPTED)
    others = [o for o in outcomes if o.status != RecipientStatus.ACCEPTED]
    replies = {o.reply for o in others}
    if not accepted and len(replies) == 1:
        return (next(iter(replies)) or others[0].status)[:MAX_REASON]
    parts = [f"{accepted} of {len(outcomes)} recipients accepted"]
    for label, statuses in (("deferred", (RecipientStatus.DEFERRED,)),
                            ("not delivered", (RecipientStatus.DEAD_LETTER,)), ("refused", _REFUSED)):
        group = [o for o in others if o.status in statuses]
        if group:
            parts.append(f"{label}: " + ", ".join(f"{o.email} ({o.reply})" for o in group))
    text = "; ".join(parts)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"
