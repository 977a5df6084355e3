"""Pure outcome logic (CONTRACT §5): SMTP replies -> attempt status, attempt status -> next step.

- 2xx after DATA: `provider_accepted`, the delivery is `sent`.
- 5xx: `provider_rejected`; the delivery is `suppressed` when the reply text matches `(?i)suppress`,
  otherwise `failed`. No retry.
- 4xx, and 552 in reply to RCPT (RFC 5321 §4.5.3.1.10): `provider_deferred`.
- Connection, TLS, AUTH or protocol errors: `transport_failed`; MAIL_SMTP_TIMEOUT: `timed_out`.
- Those three are retried on the ladder: a failure at ladder step k waits ladder[k] and moves to
  step k + 1; a retryable failure once every step is used dead-letters the delivery.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailtrio.enums import DeliveryStatus
from mailtrio.providers.base import AttemptStatus, Phase, RecipientReply, Reply

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
