"""`mailtrio enqueue`: a producer helper that XADDs one well-formed command (CONTRACT §1, §4).

    mailtrio enqueue --source S --template T --locale L --to ADDR [--to ADDR ...]
                     [--var k=v ...] [--send-at TS] [--idempotency-key K] [--delivery-id D]

Reads MAIL_REDIS_MASTER_ADDR (required), MAIL_REDIS_PASSWORD, MAIL_REDIS_DB and
MAIL_REDIS_COMMAND_STREAM. The entry is checked with the service's own validation before it is
sent (the template is checked by the service against its catalog). Prints the delivery id.
A delivery id is generated when not given, and the idempotency key defaults to one derived from
it, so running the same command line twice with `--delivery-id` yields one delivery. The entry
carries a fresh W3C `traceparent`, so the service's intake span has a parent to hang from.

Exit codes: 0 sent; 2 bad arguments or configuration (one line naming the problem); 1 Redis
could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from mailtrio.commands import SOURCES, Malformed, validate
from mailtrio.enums import PayloadMode

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def add_enqueue_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "enqueue",
        help="XADD one well-formed command and print its delivery id",
        description="Add one well-formed template command to the command stream.",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--template", required=True, metavar="T", help="template_id in the catalog")
    p.add_argument("--locale", required=True, metavar="L", help="canonical BCP 47 tag (en, fr-CA, pt-BR)")
    p.add_argument("--to", required=True, action="append", metavar="ADDR", help="recipient (repeatable)")
    p.add_argument("--var", action="append", default=[], metavar="K=V", help="template variable (repeatable)")
    p.add_argument("--send-at", metavar="TS", help="RFC 3339 timestamp with offset (default: now)")
    p.add_argument("--idempotency-key", metavar="K", help="default: derived from the delivery id")
    p.add_argument("--delivery-id", metavar="D", help="default: a new random id")
    p.set_defaults(fn=cmd_enqueue)


def _fail(code: int, message: str) -> int:
    print(f"mailtrio: {message}", file=sys.stderr, flush=True)
    return code


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def build_entry(args: argparse.Namespace) -> dict[str, str]:
    """The stream entry for the parsed arguments (raises ValueError for a bad --var)."""
    variables: dict[str, str] = {}
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--var {item!r}: expected k=v")
        variables[key] = value
    delivery_id = args.delivery_id or f"cli-{uuid.uuid4()}"
    payload: dict[str, Any] = {"template_id": args.template, "to": list(args.to)}
    if variables:
        payload["variables"] = variables
    entry = {
        "delivery_id": delivery_id,
        "source": args.source,
        "idempotency_key": args.idempotency_key or f"enqueue:{delivery_id}",
        "payload_mode": PayloadMode.TEMPLATE.value,
        "locale": args.locale,
        "payload": json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
        "traceparent": new_traceparent(),
    }
    if args.send_at:
        entry["send_at"] = args.send_at
    return entry


def cmd_enqueue(args: argparse.Namespace) -> int:
    from mailtrio.config import parse_hostport
    from mailtrio.stream import add_entry

    addr = os.environ.get("MAIL_REDIS_MASTER_ADDR", "").strip()
    if not addr:
        return _fail(EXIT_CONFIG, "configuration error: MAIL_REDIS_MASTER_ADDR: is required")
    try:
        host, port = parse_hostport(addr)
    except ValueError as exc:
        return _fail(EXIT_CONFIG, f"configuration error: MAIL_REDIS_MASTER_ADDR: {exc}")
    db_raw = os.environ.get("MAIL_REDIS_DB", "").strip() or "0"
    if not db_raw.isdigit():
        return _fail(EXIT_CONFIG, f"configuration error: MAIL_REDIS_DB: must be an integer, got {db_raw!r}")
    stream = os.environ.get("MAIL_REDIS_COMMAND_STREAM", "").strip() or "mail:delivery_commands"
    try:
        entry = build_entry(args)
    except ValueError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    checked = validate(
        "0-0",
        {k.encode(): v.encode() for k, v in entry.items()},
        now=datetime.now(UTC),
        has_template=lambda _: True,
    )
    if isinstance(checked, Malformed):
        return _fail(EXIT_CONFIG, f"invalid command ({checked.failure_code}): {checked.failure_detail}")
    try:
        add_entry(host, port, entry, stream=stream, db=int(db_raw),
                  password=os.environ.get("MAIL_REDIS_PASSWORD") or None)
    except Exception as exc:
        detail = " ".join((str(exc) or type(exc).__name__).split())
        return _fail(EXIT_FAILURE, f"enqueue failed: cannot add to {stream!r} at {addr}: {detail}")
    print(entry["delivery_id"], flush=True)
    return EXIT_OK
