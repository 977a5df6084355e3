"""`mailtrio events tail`: print the delivery outcome events of MAIL_REDIS_EVENT_STREAM as JSON lines.

For operators and the README quick start ("enqueue a login code, watch its events"). Reads
MAIL_REDIS_MASTER_ADDR (required), MAIL_REDIS_PASSWORD, MAIL_REDIS_DB and MAIL_REDIS_EVENT_STREAM;
the Redis client is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

_VARIABLES = """\
variables:
  MAIL_REDIS_MASTER_ADDR   host:port of Redis (required)
  MAIL_REDIS_PASSWORD      Redis AUTH password, when it has one
  MAIL_REDIS_DB            Redis database number (default 0)
  MAIL_REDIS_EVENT_STREAM  the event stream (default {stream})"""

_EVENTS_HELP = """\
Delivery outcome events, as the service's event publisher writes them to MAIL_REDIS_EVENT_STREAM
(README "Outcome events"; the AsyncAPI document describes every field).

event types:
  {types}

{variables}

exit codes:
  0  done
  1  Redis unreachable, or it refused the read
  2  a variable is missing or invalid, or bad usage
"""

_TAIL_HELP = """\
Print delivery outcome events as JSON lines (the stream entry ID as `id`, then every field in a
fixed order), waiting for new ones until interrupted (Ctrl-C), --count events were printed or
--timeout passed without one. Nothing is acknowledged or removed: any number of tails can run.

event types:
  {types}

{variables}

exit codes:
  0  stopped: interrupted, --count reached or --timeout passed
  1  Redis unreachable, or it refused the read (one line naming the stream and address)
  2  a variable is missing or invalid, --from is not a stream entry ID, or bad usage
"""


def add_events_parser(subparsers: Any) -> None:
    from mailtrio.config import VARIABLES
    from mailtrio.enums import EVENT_TYPES

    fmt = argparse.RawDescriptionHelpFormatter
    text = {"types": ", ".join(EVENT_TYPES),
            "variables": _VARIABLES.format(stream=VARIABLES["MAIL_REDIS_EVENT_STREAM"][1])}
    events = subparsers.add_parser("events", help="delivery outcome events (Redis event stream)",
                                   formatter_class=fmt, description=_EVENTS_HELP.format(**text))
    esub = events.add_subparsers(dest="events_command", required=True)
    tail = esub.add_parser(
        "tail",
        help="print the events of MAIL_REDIS_EVENT_STREAM as JSON lines",
        formatter_class=fmt,
        description=_TAIL_HELP.format(**text),
    )
    tail.add_argument("--from", dest="from_id", default="$", metavar="ID",
                      help="print entries after this stream entry ID (`0`: from the beginning; "
                           "default `$`: only new ones)")
    tail.add_argument("--delivery-id", help="only the events of this delivery")
    tail.add_argument("--count", type=int, default=0, help="exit after printing this many events")
    tail.add_argument("--timeout", type=float, default=0.0,
                      help="exit after this many seconds without a new event (default: wait forever)")
    tail.set_defaults(fn=cmd_events_tail)


_ENTRY_ID_RE = re.compile(r"^(\$|\d+(-\d+)?)$")

# The order fields are printed in (an entry is a map: the stream does not keep one); others follow
# in name order.
FIELD_ORDER = ("event_id", "event", "delivery_id", "source", "idempotency_key", "status", "attempt_no",
               "attempt_status", "reason", "reply", "next_attempt_at", "previous_status", "failure_code",
               "failure_detail", "recipients", "stream_entry_id", "traceparent", "occurred_at")
_RANK = {name: i for i, name in enumerate(FIELD_ORDER)}


def ordered(entry_id: str, fields: Mapping[str, str]) -> dict[str, str]:
    """The JSON line of one entry: `id`, then the fields in FIELD_ORDER, then the rest by name."""
    names = sorted(fields, key=lambda k: (_RANK.get(k, len(_RANK)), k))
    return {"id": entry_id, **{k: fields[k] for k in names}}


def cmd_events_tail(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    from mailtrio.config import VARIABLES, parse_hostport
    from mailtrio.stream import StreamError, tail_entries

    env = os.environ if env is None else env

    def fail(code: int, message: str) -> int:
        print(f"mailtrio: {message}", file=sys.stderr, flush=True)
        return code

    addr = env.get("MAIL_REDIS_MASTER_ADDR", "").strip()
    if not addr:
        return fail(2, "configuration error: MAIL_REDIS_MASTER_ADDR: is required")
    try:
        host, port = parse_hostport(addr)
    except ValueError as exc:
        return fail(2, f"configuration error: MAIL_REDIS_MASTER_ADDR: {exc}")
    db_raw = env.get("MAIL_REDIS_DB", "").strip() or "0"
    if not db_raw.isdigit():
        return fail(2, f"configuration error: MAIL_REDIS_DB: must be an integer, got {db_raw!r}")
    key = env.get("MAIL_REDIS_EVENT_STREAM", "").strip() or VARIABLES["MAIL_REDIS_EVENT_STREAM"][1]
    if not _ENTRY_ID_RE.match(args.from_id):
        return fail(2, f"--from: not a stream entry ID: {args.from_id!r}")
    printed = 0
    idle_since = time.monotonic()
    try:
        for entry_id, fields in tail_entries(host, port, stream=key, after=args.from_id, db=int(db_raw),
                                             password=env.get("MAIL_REDIS_PASSWORD") or None,
                                             block=1.0, idle_marker=True):
            if entry_id is None:
                if args.timeout and time.monotonic() - idle_since >= args.timeout:
                    return 0
                continue
            idle_since = time.monotonic()
            if args.delivery_id and fields.get("delivery_id") != args.delivery_id:
                continue
            print(json.dumps(ordered(entry_id, fields), ensure_ascii=False), flush=True)
            printed += 1
            if args.count and printed >= args.count:
                return 0
    except KeyboardInterrupt:
        return 0
    except StreamError as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return fail(1, f"events tail failed: cannot read {key!r} at {addr}: {detail}")
    return 0
