"""The contract's enumerations, defined once (CONTRACT §4, §5, §6).

Code, the OpenAPI document, the AsyncAPI document and the CLI take their values from here; a test
checks them against the schema's CHECK constraints and the documents. Each enumeration is a
`StrEnum` (its members compare equal to the plain strings stored in PostgreSQL) and a tuple of its
values in contract order (plain strings).
"""

from __future__ import annotations

from enum import StrEnum


class DeliveryStatus(StrEnum):
    """`mail.deliveries.status`."""

    QUEUED = "queued"
    RENDERED = "rendered"
    SENDING = "sending"
    SENT = "sent"
    SUPPRESSED = "suppressed"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    CANCELLED = "cancelled"


class AttemptStatus(StrEnum):
    """`mail.attempts.status`."""

    PROVIDER_ACCEPTED = "provider_accepted"
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_DEFERRED = "provider_deferred"
    TRANSPORT_FAILED = "transport_failed"
    TIMED_OUT = "timed_out"
    SUPPRESSED = "suppressed"
    INTERRUPTED = "interrupted"


class Source(StrEnum):
    """`source` of a delivery command and `mail.deliveries.source`."""

    AUTHSESSION = "authsession"
    NOTIFICATION = "notification"


class PayloadMode(StrEnum):
    """`payload_mode` of a delivery command and `mail.deliveries.payload_mode`."""

    TEMPLATE = "template"
    RENDERED = "rendered"


class FailureCode(StrEnum):
    """`mail.malformed_commands.failure_code`: why a stream command was quarantined."""

    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    INVALID_LOCALE = "invalid_locale"
    INVALID_RECIPIENT = "invalid_recipient"
    UNKNOWN_TEMPLATE = "unknown_template"
    UNSAFE_HEADER = "unsafe_header"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    STALE_COMMAND = "stale_command"


DELIVERY_STATUSES: tuple[str, ...] = tuple(m.value for m in DeliveryStatus)
ATTEMPT_STATUSES: tuple[str, ...] = tuple(m.value for m in AttemptStatus)
SOURCES: tuple[str, ...] = tuple(m.value for m in Source)
PAYLOAD_MODES: tuple[str, ...] = tuple(m.value for m in PayloadMode)
FAILURE_CODES: tuple[str, ...] = tuple(m.value for m in FailureCode)
# Statuses a delivery waits in on the schedule, and those it never leaves.
WAITING_STATUSES: tuple[str, ...] = ("queued", "rendered")
TERMINAL_STATUSES: tuple[str, ...] = ("sent", "suppressed", "failed", "dead_letter", "cancelled")
