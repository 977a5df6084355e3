"""The contract's enumerations, defined once (CONTRACT §4, §5, §6), and the service's own: the
delivery event types (sql/00008_delivery_events.sql) and the per-recipient outcome statuses
(`recipient_outcomes`, sql/00007_recipient_outcomes.sql).

Code, the OpenAPI document, the AsyncAPI document and the CLI take their values from here; a test
(tests/foundation/test_enumerations.py) checks them against the schema's CHECK constraints and
the documents. Each enumeration is a
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


class EventType(StrEnum):
    """`event` of a delivery event (`mail.delivery_events.event`, the event stream's entries).

    A final status change is the event of that name; `deferred` is an attempt that left the
    delivery waiting, `retried` an operator's retry of a final delivery, `rejected` a malformed
    command."""

    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    SENT = "sent"
    SUPPRESSED = "suppressed"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    CANCELLED = "cancelled"
    RETRIED = "retried"
    REJECTED = "rejected"


class RecipientStatus(StrEnum):
    """`status` of one envelope recipient's outcome (`recipient_outcomes` of a delivery)."""

    # never stored: the API shows it for a recipient not tried yet
    PENDING = "pending"
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    REJECTED = "rejected"
    SUPPRESSED = "suppressed"
    DEAD_LETTER = "dead_letter"


DELIVERY_STATUSES: tuple[str, ...] = tuple(m.value for m in DeliveryStatus)
ATTEMPT_STATUSES: tuple[str, ...] = tuple(m.value for m in AttemptStatus)
SOURCES: tuple[str, ...] = tuple(m.value for m in Source)
PAYLOAD_MODES: tuple[str, ...] = tuple(m.value for m in PayloadMode)
FAILURE_CODES: tuple[str, ...] = tuple(m.value for m in FailureCode)
EVENT_TYPES: tuple[str, ...] = tuple(m.value for m in EventType)
RECIPIENT_STATUSES: tuple[str, ...] = tuple(m.value for m in RecipientStatus)
# Statuses a delivery waits in on the schedule, and those it never leaves.
WAITING_STATUSES: tuple[str, ...] = (DeliveryStatus.QUEUED.value, DeliveryStatus.RENDERED.value)
TERMINAL_STATUSES: tuple[str, ...] = tuple(
    m.value for m in (DeliveryStatus.SENT, DeliveryStatus.SUPPRESSED, DeliveryStatus.FAILED,
                      DeliveryStatus.DEAD_LETTER, DeliveryStatus.CANCELLED))
