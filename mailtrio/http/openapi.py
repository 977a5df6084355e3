"""The OpenAPI 3.1 description of the internal HTTP API, served at /api/v1/internal/openapi.json.

Built from the same enumerations and limits the handlers validate with, so the document cannot
drift from the code. Bearer security is declared only when the instance has a token configured
(MAIL_INTERNAL_HTTP_TOKEN): the document describes the instance that serves it.
"""

from __future__ import annotations

from typing import Any

from mailtrio import __version__, enums
from mailtrio.http import params
from mailtrio.http.errors import STATUS_BY_CODE

_REF = "#/components/"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"{_REF}{kind}/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    return out


def _obj(properties: dict[str, Any], *, description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339 UTC, millisecond precision"}
_COUNT = {"type": "integer", "minimum": 0}
_DELIVERY_ID = {"type": "string", "pattern": f"^{params.DELIVERY_ID_RE.pattern}$"}


def _schemas() -> dict[str, Any]:
    recipient = {
        "type": "object",
        "required": ["email"],
        "properties": {"email": _STR, "name": _nullable(_STR)},
    }
    recipients = _obj({part: {"type": "array", "items": _ref("schemas", "Recipient")} for part in ("to", "cc", "bcc")})
    attempt = _obj({
        "attempt_no": {"type": "integer", "minimum": 1},
        "status": {"type": "string", "enum": list(enums.ATTEMPT_STATUSES)},
        "started_at": _TIME,
        "finished_at": _TIME,
        "duration_ms": _COUNT,
        "provider_summary": _nullable(_STR),
        "instance_id": _STR,
    })
    delivery = _obj({
        "delivery_id": _DELIVERY_ID,
        "source": {"type": "string", "enum": list(enums.SOURCES)},
        "status": {"type": "string", "enum": list(enums.DELIVERY_STATUSES)},
        "status_reason": _nullable(_STR),
        "payload_mode": {"type": "string", "enum": list(enums.PAYLOAD_MODES)},
        "template_id": _nullable(_STR),
        "locale": _STR,
        "resolved_locale": _nullable(_STR),
        "recipients": _ref("schemas", "Recipients"),
        "send_at": _nullable(_TIME),
        "next_attempt_at": _nullable(_TIME),
        "attempt_count": _COUNT,
        "message_id": _STR,
        "created_at": _TIME,
        "updated_at": _TIME,
        "attempts": {"type": "array", "items": _ref("schemas", "Attempt")},
        "dead_letter": _nullable(_ref("schemas", "DeadLetterEntry")),
        "recipient_outcomes": {
            "type": "array", "items": _ref("schemas", "RecipientOutcome"),
            "description": "each envelope recipient (to, cc, bcc; each address once) with its own outcome; "
                           "a retry goes only to those `deferred`, and the delivery is final when every "
                           "recipient is",
        },
    })
    recipient_outcome = _obj({
        "email": _STR,
        "status": {"type": "string", "enum": list(enums.RECIPIENT_STATUSES),
                   "description": "`pending`: not tried yet; `accepted`: RCPT and message accepted; "
                                  "`deferred`: refused for now (4xx), retried on the ladder; `rejected` "
                                  "and `suppressed`: refused for good (5xx); `dead_letter`: still "
                                  "deferred when the ladder ran out"},
        "reply": {**_nullable(_STR), "description": "the last server reply (or failure) that concerned "
                                                   "this recipient"},
        "attempt_no": {**_nullable({"type": "integer", "minimum": 1}),
                       "description": "the attempt that gave this outcome"},
    })
    content = _obj({
        "delivery_id": _DELIVERY_ID,
        "message_id": _STR,
        "subject": _STR,
        "text": _nullable(_STR),
        "html": _nullable(_STR),
        "headers": {"type": "object", "additionalProperties": _STR,
                    "description": "extra headers stored with the rendered content, by name"},
        "rendered_at": _TIME,
    }, description="The content rendered once and reused by every attempt.")
    dead_letter = _obj({
        "delivery_id": _DELIVERY_ID,
        "reason": _STR,
        "created_at": _TIME,
        "source": {"type": "string", "enum": list(enums.SOURCES)},
        "status": {"type": "string", "enum": list(enums.DELIVERY_STATUSES)},
        "template_id": _nullable(_STR),
        "recipients": _ref("schemas", "Recipients"),
        "attempt_count": _COUNT,
        "message_id": _STR,
        "last_attempt": _nullable(_ref("schemas", "LastAttempt")),
    })
    last_attempt = _obj({
        "attempt_no": {"type": "integer", "minimum": 1},
        "status": {"type": "string", "enum": list(enums.ATTEMPT_STATUSES)},
        "provider_summary": _nullable(_STR),
        "finished_at": _TIME,
    })
    malformed = _obj({
        "id": {"type": "integer", "minimum": 1},
        "failure_code": {"type": "string", "enum": list(enums.FAILURE_CODES)},
        "failure_detail": _STR,
        "stream_entry_id": _STR,
        "delivery_id": _nullable(_STR),
        "source": _nullable(_STR),
        "fields": {"type": "object", "description": "the raw stream entry, field to value"},
        "received_at": _TIME,
    })
    by_status = _obj({status: _COUNT for status in enums.DELIVERY_STATUSES})
    schedule = _obj({
        "depth": {**_COUNT, "description": "deliveries in queued or rendered, due or not"},
        "oldest_age_ms": {**_COUNT, "description": "now minus the earliest moment a waiting delivery "
                                                   "entered the schedule (0 when none waits)"},
        "by_status": by_status,
    })
    error = _obj({
        "error": _obj({
            "code": {"type": "string", "enum": list(STATUS_BY_CODE)},
            "message": _STR,
        })
    })

    def page(item: str) -> dict[str, Any]:
        return _obj({
            "items": {"type": "array", "items": _ref("schemas", item)},
            "next_cursor": {**_nullable(_STR), "description": "pass as `cursor` for the next page; "
                                                              "null on the last page"},
        })

    return {
        "Error": error,
        "Recipient": recipient,
        "Recipients": recipients,
        "RecipientOutcome": recipient_outcome,
        "Attempt": attempt,
        "DeadLetterEntry": _obj({"reason": _STR, "created_at": _TIME}),
        "Delivery": delivery,
        "DeliveryPage": page("Delivery"),
        "Content": content,
        "LastAttempt": last_attempt,
        "DeadLetter": dead_letter,
        "DeadLetterPage": page("DeadLetter"),
        "MalformedCommand": malformed,
        "MalformedCommandPage": page("MalformedCommand"),
        "Schedule": schedule,
        "EventOutbox": _obj({
            "depth": {**_COUNT, "description": "delivery events written but not yet published to the "
                                               "event stream"},
            "oldest_age_ms": {**_COUNT, "description": "age of the oldest unpublished event (0 when none)"},
            "publisher": {**_nullable(_STR), "description": "MAIL_INSTANCE_ID of the instance publishing "
                                                             "now; null when none holds the publisher lock"},
        }),
    }


def _parameters() -> dict[str, Any]:
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return {
        "DeliveryId": {"name": "delivery_id", "in": "path", "required": True, "schema": _DELIVERY_ID},
        "Limit": query("limit", {"type": "integer", "minimum": 1, "maximum": params.MAX_LIMIT,
                                 "default": params.DEFAULT_LIMIT}, "page size"),
        "Cursor": query("cursor", {"type": "string", "minLength": 1, "maxLength": params.MAX_CURSOR_LENGTH,
                                   "pattern": "^[A-Za-z0-9_-]+$"},
                        "opaque: the `next_cursor` of the previous page of the same listing"),
        "Status": query("status", {"type": "string", "enum": list(enums.DELIVERY_STATUSES)},
                        "only deliveries in this status"),
        "Source": query("source", {"type": "string", "enum": list(enums.SOURCES)},
                        "only deliveries of this source"),
        "Recipient": query("recipient", {"type": "string", "minLength": 1,
                                         "maxLength": params.MAX_RECIPIENT_LENGTH,
                                         "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
                           "only deliveries with this address in to, cc or bcc (case-insensitive); "
                           "each item's `recipient_outcomes` tells what became of it"),
        "FailureCode": query("failure_code", {"type": "string", "enum": list(enums.FAILURE_CODES)},
                             "only malformed commands with this failure code"),
    }


def _responses() -> dict[str, Any]:
    def error(description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": _ref("schemas", "Error")}}}

    return {
        "InvalidArgument": error("invalid_argument: a parameter is malformed"),
        "Unauthorized": {**error("unauthorized: missing or wrong bearer token"), "headers": {
            "WWW-Authenticate": {"description": 'the challenge: Bearer realm="mailtrio" (with error="invalid_token" '
                                 "when a wrong token was sent)", "schema": {"type": "string"}}}},
        "NotFound": error("not_found: no such delivery"),
        "Conflict": error("conflict: the delivery's status does not allow this"),
        "Internal": error("internal: the service could not answer (e.g. the database is unreachable)"),
    }


def _ok(status: int, schema: str, description: str) -> dict[str, Any]:
    return {str(status): {"description": description,
                          "content": {"application/json": {"schema": _ref("schemas", schema)}}}}


def _errors(*names: str) -> dict[str, Any]:
    codes = {"InvalidArgument": "400", "Unauthorized": "401", "NotFound": "404", "Conflict": "409",
             "Internal": "500"}
    return {codes[name]: _ref("responses", name) for name in ("Unauthorized", "Internal", *names)}


def document(prefix: str, *, bearer: bool) -> dict[str, Any]:
    did = [_ref("parameters", "DeliveryId")]
    paths: dict[str, Any] = {
        "/deliveries": {"get": {
            "operationId": "listDeliveries",
            "summary": "Deliveries, newest first",
            "parameters": [_ref("parameters", n) for n in ("Status", "Source", "Recipient", "Limit", "Cursor")],
            "responses": {**_ok(200, "DeliveryPage", "one page of deliveries"), **_errors("InvalidArgument")},
        }},
        "/deliveries/{delivery_id}": {"get": {
            "operationId": "getDelivery",
            "summary": "A delivery with its attempts and dead-letter entry",
            "parameters": did,
            "responses": {**_ok(200, "Delivery", "the delivery"), **_errors("InvalidArgument", "NotFound")},
        }},
        "/deliveries/{delivery_id}/content": {"get": {
            "operationId": "getDeliveryContent",
            "summary": "The stored rendered subject, text, html and headers",
            "description": "409 conflict while the delivery has no rendered content: it is still "
                           "`queued` (not rendered yet) or its rendering failed.",
            "parameters": did,
            "responses": {**_ok(200, "Content", "the rendered content"),
                          **_errors("InvalidArgument", "NotFound", "Conflict")},
        }},
        "/deliveries/{delivery_id}/retry": {"post": {
            "operationId": "retryDelivery",
            "summary": "Put a failed or dead_letter delivery back on the schedule with a fresh ladder",
            "description": "Status becomes `rendered` (content stored) or `queued`, due now; the "
                           "dead-letter entry is removed. Any other status: 409.",
            "parameters": did,
            "responses": {**_ok(202, "Delivery", "back on the schedule"),
                          **_errors("InvalidArgument", "NotFound", "Conflict")},
        }},
        "/deliveries/{delivery_id}/cancel": {"post": {
            "operationId": "cancelDelivery",
            "summary": "Cancel a queued or rendered delivery",
            "description": "Status becomes `cancelled` with reason `cancelled by operator`. A delivery "
                           "already claimed (`sending`) or finished: 409.",
            "parameters": did,
            "responses": {**_ok(200, "Delivery", "cancelled"),
                          **_errors("InvalidArgument", "NotFound", "Conflict")},
        }},
        "/dead-letters": {"get": {
            "operationId": "listDeadLetters",
            "summary": "Dead-letter entries, newest first",
            "parameters": [_ref("parameters", n) for n in ("Limit", "Cursor")],
            "responses": {**_ok(200, "DeadLetterPage", "one page of dead letters"),
                          **_errors("InvalidArgument")},
        }},
        "/malformed-commands": {"get": {
            "operationId": "listMalformedCommands",
            "summary": "Stored malformed commands, newest first",
            "parameters": [_ref("parameters", n) for n in ("FailureCode", "Limit", "Cursor")],
            "responses": {**_ok(200, "MalformedCommandPage", "one page of malformed commands"),
                          **_errors("InvalidArgument")},
        }},
        "/schedule": {"get": {
            "operationId": "getSchedule",
            "summary": "The attempt schedule: depth, age of the oldest waiting delivery, counts by status",
            "responses": {**_ok(200, "Schedule", "the schedule summary"), **_errors()},
        }},
        "/events/outbox": {"get": {
            "operationId": "getEventOutbox",
            "summary": "The outbox of delivery events: unpublished depth, oldest age, the publishing instance",
            "responses": {**_ok(200, "EventOutbox", "the outbox summary"), **_errors()},
        }},
        "/openapi.json": {"get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "responses": {"200": {"description": "the OpenAPI 3.1 document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          **_errors()},
        }},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mailtrio internal API",
            "version": __version__,
            "description": "Operator reads and verbs of the mail delivery service. Errors are "
                           '`{"error": {"code", "message"}}`.',
        },
        "servers": [{"url": prefix}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "responses": _responses(),
        },
    }
    if bearer:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearerAuth": []}]
    else:
        # No token configured: nothing answers 401.
        for item in paths.values():
            for operation in item.values():
                operation["responses"].pop("401", None)
    return doc
