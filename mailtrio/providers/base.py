"""What a provider is and what it reports (no I/O here).

A provider hands one message to the outside world. The attempt workers each open their own
`Session` (for SMTP: one persistent connection per worker) and call `send` once per attempt,
inside the cancel scope that bounds the attempt by MAIL_SMTP_TIMEOUT (or the lease's end, if
earlier). A session never raises for what the server or the network did: it returns a `SendReport`
whose `status` is already one of the contract's attempt statuses. Only cancellation propagates.

The lease check: `Envelope.lease_ok`, when given, is asked right before the transaction starts
(`MAIL FROM`) and right before the message content is written (after `DATA` was answered 354).
When it says no (the lease has too little time left: the process was stopped or stalled, or its
identity lock is lost), the session sends nothing more for this delivery, drops the connection if
a transaction was open (without the final dot, so the server discards it) and returns
`SendReport.unsent(...)`: nothing was handed over, and no attempt is counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from mailtrio.enums import AttemptStatus

__all__ = ["AttemptStatus"]  # re-exported: providers report the contract's attempt statuses


class Phase(StrEnum):
    """Where in an SMTP session a reply or failure happened (BUILD: before any, the message
    could not be built)."""

    BUILD = "build"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    MESSAGE = "message"
    STUB = "stub"


_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, RFC 3463 enhanced status code (when given) and text."""

    code: int
    text: str
    enhanced: str | None = None

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split an enhanced status code off the front of the reply text (control characters,
        which a server may send but PostgreSQL text cannot always hold, become spaces)."""
        text = " ".join(_CONTROL_RE.sub(" ", message).split())
        m = _ENHANCED_RE.match(text)
        if m:
            return cls(code, text[m.end():], m.group(1))
        return cls(code, text)

    def summary(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}


@dataclass(frozen=True)
class RecipientReply:
    address: str
    reply: Reply

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, **self.reply.as_json()}


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one attempt. Bcc recipients are here and never in the headers."""

    sender: str
    recipients: Sequence[str]
    source: str
    delivery_id: str
    message_id: str
    smtputf8: bool = False
    # True while the lease leaves time to start MAIL FROM / the message content (see above).
    lease_ok: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def may_proceed(self) -> bool:
        return self.lease_ok is None or self.lease_ok()


@dataclass(frozen=True)
class SendReport:
    """The classified result of one send.

    `summary` is the short human text stored as the attempt's provider_summary and, for failed,
    suppressed and dead-lettered deliveries, as the delivery's status_reason (code, enhanced code,
    text; never credentials). `details` holds the per-recipient replies and the phase.
    """

    status: AttemptStatus
    summary: str
    phase: Phase
    reply: Reply | None = None
    recipients: tuple[RecipientReply, ...] = ()
    suppressed: bool = False
    # True when the message bytes may have reached the server (DATA content was written).
    handed_over: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # True when the lease check stopped the send before anything was handed over: the delivery
    # is given back unsent and no attempt is counted (`status` is then only nominal).
    released: bool = False

    @classmethod
    def unsent(cls, phase: Phase, why: str) -> SendReport:
        """Nothing was sent: the lease check said no before `phase`."""
        return cls(AttemptStatus.TIMED_OUT, f"not sent: {why}", phase, released=True)

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": str(self.phase)}
        if self.reply is not None:
            out["reply"] = self.reply.as_json()
        if self.recipients:
            out["recipients"] = [r.as_json() for r in self.recipients]
        out.update(self.extra)
        return out


class Session(Protocol):
    """One worker's channel to the provider (for SMTP: a persistent connection).

    `phase` and `handed_over` say how far the current (or last) send got, for the report of a
    send cut short from outside (MAIL_SMTP_TIMEOUT, the lease's end): `handed_over` is true from
    just before the message content is written until its reply has been read, the window in
    which the server may hold the message without the sender knowing (RFC 1047)."""

    phase: Phase
    handed_over: bool

    async def send(self, envelope: Envelope, message: bytes) -> SendReport:
        """Send one message. Never raises for server or network failures; may be cancelled."""
        ...

    async def abort(self) -> None:
        """Drop the connection at once (after a timeout or cancellation); never blocks."""
        ...

    async def close(self) -> None:
        """Close politely (QUIT), bounded in time."""
        ...


class Provider(Protocol):
    name: str

    def session(self) -> Session:
        """A new session for one attempt worker."""
        ...
