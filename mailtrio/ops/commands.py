"""The queue subcommands: `deliveries`, `dead-letters`, `malformed`, `schedule`.

Each talks to the internal HTTP API of a running `mailtrio serve` (address from
MAIL_INTERNAL_HTTP_ADDR, token from MAIL_INTERNAL_HTTP_TOKEN, both overridable by flags), prints an
aligned table (or `--json`) and exits 0 when everything asked was done, 1 when part or all of it
was not (refused, not found, service unreachable, token refused), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from mailtrio.config import format_duration, parse_duration
from mailtrio.enums import DELIVERY_STATUSES, FAILURE_CODES, SOURCES
from mailtrio.ops import output
from mailtrio.ops.client import DEFAULT_ADDR, ApiClient, OpsError, UsageError

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2

# Bounds of the bulk commands: a listing walks at most this many items, a bulk retry retries at
# most `--max` (default below) and says how many it left.
MAX_LIST = 10_000
DEFAULT_BULK_MAX = 1_000

API_EPILOG = f"""\
variables:
  MAIL_INTERNAL_HTTP_ADDR   host:port of the service's internal API (default {DEFAULT_ADDR});
                            --addr overrides; a wildcard bind (0.0.0.0) is reached on loopback
  MAIL_INTERNAL_HTTP_TOKEN  bearer token, when the service has one; --token overrides

exit codes:
  0  done
  1  partly or not done: refused or unknown items, service unreachable, token refused
  2  usage error (bad flags or variables)
"""

Handler = Callable[[argparse.Namespace, ApiClient], int]


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--addr", help="internal API host:port or URL (default: MAIL_INTERNAL_HTTP_ADDR)")
    group.add_argument("--token", help="bearer token (default: MAIL_INTERNAL_HTTP_TOKEN; prefer the variable, "
                       "arguments are visible to other local users)")
    group.add_argument("--timeout", type=_seconds, default=15.0, metavar="DURATION",
                       help="bound on each API request (Go syntax, default 15s)")
    group.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    return common


def _seconds(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return value


def _count(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def add_parsers(sub: Any, dispatch: Callable[[argparse.Namespace], int]) -> None:
    """Register the queue subcommands on the top-level subparsers; `dispatch` runs them."""
    common = _common()
    fmt = argparse.RawDescriptionHelpFormatter

    def leaf(parent: Any, name: str, handler: Handler, help_text: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=description, epilog=API_EPILOG, formatter_class=fmt, parents=[common])
        p.set_defaults(fn=dispatch, ops_handler=handler)
        return p

    deliveries = sub.add_parser(
        "deliveries", help="list, show, retry or cancel deliveries (internal API)", formatter_class=fmt,
        description="Deliveries through the internal API of a running service.", epilog=API_EPILOG)
    dsub = deliveries.add_subparsers(dest="deliveries_command", required=True, metavar="{list,show,retry,cancel}")
    p = leaf(dsub, "list", deliveries_list, "list deliveries, newest first",
             "List deliveries newest first: id, status, source, template, first recipient, attempts,\n"
             "creation time and next attempt.")
    p.add_argument("--status", choices=DELIVERY_STATUSES, help="only deliveries in this status")
    p.add_argument("--source", choices=SOURCES, help="only deliveries from this source")
    p.add_argument("--recipient", help="only deliveries with this address in to, cc or bcc (case-insensitive)")
    p.add_argument("--limit", type=_count(1, MAX_LIST), default=50, help=f"at most this many (1-{MAX_LIST}, "
                   "default 50; pages are fetched as needed)")
    p = leaf(dsub, "show", deliveries_show, "show one delivery, its attempts and dead-letter entry",
             "Show one delivery: its fields, every attempt and its dead-letter entry.\n"
             "Exit 1 when it does not exist.")
    p.add_argument("delivery_id", metavar="ID")
    p = leaf(dsub, "retry", deliveries_retry, "put failed or dead_letter deliveries back on the schedule",
             "Retry deliveries: each failed or dead_letter delivery goes back on the schedule, due now,\n"
             "with a fresh retry ladder. One line per ID; exit 1 when any was refused (another status)\n"
             "or unknown.")
    p.add_argument("delivery_ids", nargs="+", metavar="ID")
    p = leaf(dsub, "cancel", deliveries_cancel, "cancel queued or rendered deliveries",
             "Cancel deliveries that have not been sent: each queued or rendered delivery becomes\n"
             "cancelled. One line per ID; exit 1 when any was refused (sending, or already final)\n"
             "or unknown.")
    p.add_argument("delivery_ids", nargs="+", metavar="ID")

    dead = sub.add_parser(
        "dead-letters", help="list or retry dead letters (internal API)", formatter_class=fmt,
        description="Dead letters (deliveries whose retry ladder is exhausted) through the internal API.",
        epilog=API_EPILOG)
    dlsub = dead.add_subparsers(dest="dead_letters_command", required=True, metavar="{list,retry}")
    p = leaf(dlsub, "list", dead_letters_list, "list dead letters, newest first",
             "List dead letters newest first: id, when it was dead-lettered, source, first recipient,\n"
             "attempts and the last attempt's status and reply.")
    p.add_argument("--limit", type=_count(1, MAX_LIST), default=50, help=f"at most this many (1-{MAX_LIST}, "
                   "default 50)")
    p = leaf(dlsub, "retry", dead_letters_retry, "retry every dead letter (of the last DURATION)",
             "Retry dead letters in bulk, newest first: every one (--all), or those dead-lettered\n"
             "within --since. At most --max are retried; the command says how many it retried, how\n"
             "many were refused and whether more remain (then exit 1: run it again).")
    p.add_argument("--all", action="store_true", required=True, help="required: retry every matching dead letter")
    p.add_argument("--since", type=_seconds, metavar="DURATION",
                   help="only those dead-lettered within this long (Go syntax: 30m, 1h, 24h)")
    p.add_argument("--max", type=_count(1, MAX_LIST), default=DEFAULT_BULK_MAX, dest="max_items",
                   help=f"retry at most this many (default {DEFAULT_BULK_MAX}, at most {MAX_LIST})")

    malformed = sub.add_parser(
        "malformed", help="list malformed stream commands (internal API)", formatter_class=fmt,
        description="Malformed stream commands (acknowledged and quarantined) through the internal API.",
        epilog=API_EPILOG)
    msub = malformed.add_subparsers(dest="malformed_command", required=True, metavar="{list}")
    p = leaf(msub, "list", malformed_list, "list malformed commands, newest first",
             "List malformed commands newest first: id, failure code, received at, delivery id,\n"
             "source, stream entry id and the failure detail.")
    p.add_argument("--failure-code", choices=FAILURE_CODES, help="only this failure code")
    p.add_argument("--limit", type=_count(1, MAX_LIST), default=50, help=f"at most this many (1-{MAX_LIST}, "
                   "default 50)")

    leaf(sub, "schedule", schedule, "the schedule's depth, oldest age and counts by status",
         "Summarise the schedule, like postqueue -p's last line: deliveries waiting to be sent\n"
         "(queued and rendered, due or not), the age of the oldest, and the count of deliveries\n"
         "in every status.")


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run the queue subcommand parsed into `args`, with `env` for the API address and token."""
    addr = args.addr or env.get("MAIL_INTERNAL_HTTP_ADDR", "").strip() or DEFAULT_ADDR
    token = args.token if args.token is not None else (env.get("MAIL_INTERNAL_HTTP_TOKEN") or None)
    try:
        client = ApiClient(addr, token, timeout=args.timeout)
        return int(args.ops_handler(args, client))
    except UsageError as exc:
        print(f"mailtrio: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except OpsError as exc:
        print(f"mailtrio: {exc}", file=sys.stderr, flush=True)
        return EXIT_PARTIAL


# -- deliveries --------------------------------------------------------------------------------------


def deliveries_list(args: argparse.Namespace, client: ApiClient) -> int:
    query = {"status": args.status, "source": args.source, "recipient": args.recipient}
    items, more = client.pages("/deliveries", query, args.limit)
    if args.json:
        output.emit_json(items)
        return EXIT_OK
    output.table(
        ["delivery_id", "status", "source", "template", "recipient", "attempts", "created", "next_attempt"],
        [[d["delivery_id"], d["status"], d["source"], d.get("template_id"), output.recipients(d.get("recipients")),
          d.get("attempt_count"), output.when(d.get("created_at")), output.when(d.get("next_attempt_at"))]
         for d in items],
    )
    print(f"-- {len(items)} deliveries{' (more: raise --limit)' if more else ''}")
    return EXIT_OK


def deliveries_show(args: argparse.Namespace, client: ApiClient) -> int:
    answer = client.request("GET", f"/deliveries/{_path_id(args.delivery_id)}")
    if not answer.ok:
        print(f"mailtrio: {args.delivery_id}: {answer.error_code}: {answer.error_message}", file=sys.stderr)
        return EXIT_PARTIAL
    d = answer.body
    if args.json:
        output.emit_json(d)
        return EXIT_OK
    fields = [
        ("delivery_id", d["delivery_id"]), ("status", d["status"]), ("status_reason", d.get("status_reason")),
        ("source", d["source"]), ("payload_mode", d.get("payload_mode")), ("template_id", d.get("template_id")),
        ("locale", d.get("locale")), ("resolved_locale", d.get("resolved_locale")),
    ]
    for part in ("to", "cc", "bcc"):
        addresses = (d.get("recipients") or {}).get(part) or []
        if addresses:
            fields.append((part, ", ".join(output.address(a) for a in addresses)))
    fields += [
        ("message_id", d.get("message_id")), ("attempt_count", d.get("attempt_count")),
        ("send_at", output.when(d.get("send_at"))), ("next_attempt_at", output.when(d.get("next_attempt_at"))),
        ("created_at", output.when(d.get("created_at"))), ("updated_at", output.when(d.get("updated_at"))),
    ]
    dead = d.get("dead_letter")
    if dead:
        fields.append(("dead_letter", f"{output.when(dead.get('created_at'))}: {dead.get('reason')}"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {'-' if value is None else value}")
    attempts = d.get("attempts") or []
    if attempts:
        print()
        output.table(
            ["attempt", "status", "started", "duration_ms", "instance", "provider_summary"],
            [[a["attempt_no"], a["status"], output.when(a.get("started_at")), a.get("duration_ms"),
              a.get("instance_id"), a.get("provider_summary")] for a in attempts],
        )
    return EXIT_OK


def deliveries_retry(args: argparse.Namespace, client: ApiClient) -> int:
    return _verb(args, client, "retry", "retried")


def deliveries_cancel(args: argparse.Namespace, client: ApiClient) -> int:
    return _verb(args, client, "cancel", "cancelled")


def _verb(args: argparse.Namespace, client: ApiClient, verb: str, done_word: str) -> int:
    results = [_apply(client, verb, did) for did in args.delivery_ids]
    if args.json:
        output.emit_json(results)
    else:
        for r in results:
            if r["ok"]:
                print(f"{r['delivery_id']}: {done_word} (now {r['status']})")
            else:
                print(f"{r['delivery_id']}: not {done_word}: {r['error']}: {r['message']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_PARTIAL


def _apply(client: ApiClient, verb: str, delivery_id: str) -> dict[str, Any]:
    answer = client.request("POST", f"/deliveries/{_path_id(delivery_id)}/{verb}")
    if answer.ok:
        return {"delivery_id": delivery_id, "ok": True, "status": answer.body.get("status")}
    return {"delivery_id": delivery_id, "ok": False, "error": answer.error_code or str(answer.status),
            "message": answer.error_message}


def _path_id(delivery_id: str) -> str:
    import urllib.parse

    return urllib.parse.quote(delivery_id, safe="")


# -- dead letters ------------------------------------------------------------------------------------


def dead_letters_list(args: argparse.Namespace, client: ApiClient) -> int:
    items, more = client.pages("/dead-letters", {}, args.limit)
    if args.json:
        output.emit_json(items)
        return EXIT_OK
    rows = []
    for dl in items:
        last = dl.get("last_attempt") or {}
        rows.append([dl["delivery_id"], output.when(dl.get("created_at")), dl.get("source"),
                     output.recipients(dl.get("recipients")), dl.get("attempt_count"), last.get("status"),
                     last.get("provider_summary") or dl.get("reason")])
    output.table(["delivery_id", "dead_lettered", "source", "recipient", "attempts", "last_status", "last_reply"],
                 rows)
    print(f"-- {len(items)} dead letters{' (more: raise --limit)' if more else ''}")
    return EXIT_OK


def dead_letters_retry(args: argparse.Namespace, client: ApiClient) -> int:
    cutoff = datetime.now(UTC) - timedelta(seconds=args.since) if args.since is not None else None
    # Collect first (newest first, bounded), then retry: a retry removes its dead-letter entry.
    chosen: list[str] = []
    more = False
    cursor: str | None = None
    while True:
        body = client.get("/dead-letters", {"limit": 500, "cursor": cursor})
        stop = False
        for dl in body["items"]:
            if cutoff is not None and _parse_ts(dl["created_at"]) < cutoff:
                stop = True
                break
            if len(chosen) >= args.max_items:
                more, stop = True, True
                break
            chosen.append(dl["delivery_id"])
        cursor = body.get("next_cursor")
        if stop or cursor is None:
            break
    results = [_apply(client, "retry", did) for did in chosen]
    retried = [r for r in results if r["ok"]]
    refused = [r for r in results if not r["ok"]]
    scope = f"dead-lettered within {format_duration(args.since)}" if args.since is not None else "all dead letters"
    if args.json:
        output.emit_json({"scope": scope, "matched": len(chosen), "retried": [r["delivery_id"] for r in retried],
                          "refused": refused, "more_remain": more})
    else:
        for r in refused:
            print(f"{r['delivery_id']}: not retried: {r['error']}: {r['message']}")
        tail = f"; more remain beyond --max {args.max_items}: run again" if more else ""
        print(f"retried {len(retried)} of {len(chosen)} dead letters ({scope}); {len(refused)} refused{tail}")
    return EXIT_OK if not refused and not more else EXIT_PARTIAL


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- malformed commands and the schedule -------------------------------------------------------------


def malformed_list(args: argparse.Namespace, client: ApiClient) -> int:
    items, more = client.pages("/malformed-commands", {"failure_code": args.failure_code}, args.limit)
    if args.json:
        output.emit_json(items)
        return EXIT_OK
    output.table(
        ["id", "failure_code", "received", "delivery_id", "source", "stream_entry_id", "detail"],
        [[m["id"], m["failure_code"], output.when(m.get("received_at")), m.get("delivery_id"), m.get("source"),
          m.get("stream_entry_id"), m.get("failure_detail")] for m in items],
    )
    print(f"-- {len(items)} malformed commands{' (more: raise --limit)' if more else ''}")
    return EXIT_OK


def schedule(args: argparse.Namespace, client: ApiClient) -> int:
    body = client.get("/schedule")
    if args.json:
        output.emit_json(body)
        return EXIT_OK
    by_status = body.get("by_status") or {}
    output.table(["status", "deliveries"], [[s, by_status.get(s, 0)] for s in DELIVERY_STATUSES])
    print(f"-- {body['depth']} waiting (queued, rendered), oldest {output.age_ms(body.get('oldest_age_ms'))}")
    return EXIT_OK
