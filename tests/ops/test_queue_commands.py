"""The queue subcommands against a real `mailtrio serve`: tables, --json, exit codes, wrong or
missing token, the service down, and usage errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.api.conftest import (
    insert_attempt,
    insert_dead_letter,
    insert_delivery,
    insert_malformed,
    new_id,
    status_of,
)
from tests.foundation.conftest import closed_addr, run_cli
from tests.ops.conftest import Service
from tests.support.serve import base_env


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of an aligned table (cells split on runs of two or more spaces)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith("--")]
    header = re.split(r"\s{2,}", lines[0].strip())
    return header, [re.split(r"\s{2,}", ln.strip()) for ln in lines[1:]]


def _one_line_error(done: Any) -> str:
    assert done.stdout == "", done
    assert len(done.stderr_lines) == 1, done
    return str(done.stderr_lines[0])


def test_deliveries_list_and_show(service: Service, sql: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    old = insert_delivery(sql, status="sent", source="authsession", to=["Ada@Example.com"],
                          created_at=now - timedelta(minutes=5))
    insert_attempt(sql, old, 1, "provider_accepted", "250 2.0.0 Ok: queued")
    new = insert_delivery(sql, status="queued", to=["bob@example.com", "carol@example.com"], created_at=now)

    done = service.cli("deliveries", "list")
    assert done.code == 0, done
    header, rows = _table(done.stdout)
    assert header == ["DELIVERY_ID", "STATUS", "SOURCE", "TEMPLATE", "RECIPIENT", "ATTEMPTS", "CREATED",
                      "NEXT_ATTEMPT"]
    assert [r[:3] for r in rows] == [[new, "queued", "notification"], [old, "sent", "authsession"]]
    assert rows[0][4] == "bob@example.com +1" and rows[1][4] == "Ada@Example.com"
    assert done.stdout.rstrip().endswith("-- 2 deliveries")

    done = service.cli("deliveries", "list", "--status", "sent", "--json")
    assert done.code == 0, done
    items = json.loads(done.stdout)
    assert [d["delivery_id"] for d in items] == [old]

    done = service.cli("deliveries", "list", "--recipient", "ADA@example.com", "--source", "authsession")
    assert done.code == 0 and [r[0] for r in _table(done.stdout)[1]] == [old], done
    # --limit below the listing: the rest is announced, and pages are walked beyond 500
    done = service.cli("deliveries", "list", "--limit", "1")
    assert done.code == 0 and len(_table(done.stdout)[1]) == 1 and "(more: raise --limit)" in done.stdout

    done = service.cli("deliveries", "show", old)
    assert done.code == 0, done
    fields = dict(re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in done.stdout.split("\n\n")[0].splitlines())
    assert fields["delivery_id"] == old and fields["status"] == "sent" and fields["to"] == "Ada@Example.com"
    attempts_header, attempts = _table(done.stdout.split("\n\n")[1])
    assert attempts_header[:2] == ["ATTEMPT", "STATUS"]
    assert attempts[0][:2] == ["1", "provider_accepted"] and attempts[0][-1] == "250 2.0.0 Ok: queued"

    done = service.cli("deliveries", "show", old, "--json")
    assert done.code == 0 and json.loads(done.stdout)["attempts"][0]["status"] == "provider_accepted"

    missing = service.cli("deliveries", "show", "no-such-delivery")
    assert missing.code == 1
    assert _one_line_error(missing) == "mailtrio: no-such-delivery: not_found: delivery 'no-such-delivery' not found"


def test_retry_and_cancel_report_each_id(service: Service, sql: psycopg.Connection[Any]) -> None:
    failed = insert_delivery(sql, status="failed", status_reason="550 5.1.1 User unknown", attempt_count=1)
    insert_attempt(sql, failed, 1, "provider_rejected", "550 5.1.1 User unknown")
    sent = insert_delivery(sql, status="sent", attempt_count=1)
    queued = insert_delivery(sql, status="queued")

    done = service.cli("deliveries", "retry", failed, sent, "nope-1")
    assert done.code == 1, done
    lines = done.stdout.splitlines()
    assert re.fullmatch(rf"{failed}: retried \(now (queued|rendered|sending|sent)\)", lines[0]), lines
    assert lines[1].startswith(f"{sent}: not retried: conflict: ") and "is sent" in lines[1]
    assert lines[2].startswith("nope-1: not retried: not_found: ")
    assert status_of(sql, failed) != "failed"

    done = service.cli("deliveries", "cancel", queued, "--json")
    assert done.code == 0, done
    assert json.loads(done.stdout) == [{"delivery_id": queued, "ok": True, "status": "cancelled"}]
    assert status_of(sql, queued) == "cancelled"
    again = service.cli("deliveries", "cancel", queued, "--json")
    assert again.code == 1
    [result] = json.loads(again.stdout)
    assert result["ok"] is False and result["error"] == "conflict"


def test_dead_letters_list_and_bulk_retry(service: Service, sql: psycopg.Connection[Any]) -> None:
    now = datetime.now(UTC)
    recent, older, oldest = new_id("dl"), new_id("dl"), new_id("dl")
    for did, age in ((recent, timedelta(minutes=10)), (older, timedelta(minutes=50)), (oldest, timedelta(hours=3))):
        insert_delivery(sql, delivery_id=did, status="dead_letter", attempt_count=3,
                        status_reason="retry ladder exhausted", created_at=now - age - timedelta(hours=1))
        insert_attempt(sql, did, 3, "transport_failed", "transport failure during connect: refused")
        insert_dead_letter(sql, did, "retry ladder exhausted", created_at=now - age)

    done = service.cli("dead-letters", "list")
    assert done.code == 0, done
    header, rows = _table(done.stdout)
    assert header[:2] == ["DELIVERY_ID", "DEAD_LETTERED"] and "LAST_STATUS" in header
    assert [r[0] for r in rows] == [recent, older, oldest]
    assert rows[0][header.index("LAST_STATUS")] == "transport_failed"
    listed = json.loads(service.cli("dead-letters", "list", "--json").stdout)
    assert [d["delivery_id"] for d in listed] == [recent, older, oldest]

    # bounded: --max 1 retries the newest one of the last hour and says that more remain
    done = service.cli("dead-letters", "retry", "--all", "--since", "1h", "--max", "1")
    assert done.code == 1, done
    assert done.stdout.strip() == ("retried 1 of 1 dead letters (dead-lettered within 1h); 0 refused; "
                                   "more remain beyond --max 1: run again")
    assert status_of(sql, recent) != "dead_letter"
    done = service.cli("dead-letters", "retry", "--all", "--since", "1h", "--json")
    assert done.code == 0, done
    report = json.loads(done.stdout)
    assert report["retried"] == [older] and report["refused"] == [] and report["more_remain"] is False
    assert status_of(sql, oldest) == "dead_letter"
    done = service.cli("dead-letters", "retry", "--all")
    assert done.code == 0 and done.stdout.startswith("retried 1 of 1 dead letters (all dead letters)"), done
    assert status_of(sql, oldest) != "dead_letter"
    nothing = service.cli("dead-letters", "retry", "--all")
    assert nothing.code == 0 and nothing.stdout.startswith("retried 0 of 0"), nothing


def test_malformed_list_and_schedule(service: Service, sql: psycopg.Connection[Any]) -> None:
    locale_id = insert_malformed(sql, "invalid_locale", delivery_id="bad-1")
    json_id = insert_malformed(sql, "invalid_json")
    insert_delivery(sql, status="queued", schedule_entered_at=datetime.now(UTC) - timedelta(minutes=2))
    insert_delivery(sql, status="rendered")
    insert_delivery(sql, status="failed")

    done = service.cli("malformed", "list")
    assert done.code == 0, done
    header, rows = _table(done.stdout)
    assert header[:2] == ["ID", "FAILURE_CODE"]
    assert [(int(r[0]), r[1]) for r in rows] == [(json_id, "invalid_json"), (locale_id, "invalid_locale")]
    done = service.cli("malformed", "list", "--failure-code", "invalid_locale", "--json")
    assert done.code == 0 and [m["id"] for m in json.loads(done.stdout)] == [locale_id], done

    done = service.cli("schedule")
    assert done.code == 0, done
    header, rows = _table(done.stdout)
    counts = {r[0]: int(r[1]) for r in rows}
    assert header == ["STATUS", "DELIVERIES"]
    assert counts == {"queued": 1, "rendered": 1, "sending": 0, "sent": 0, "suppressed": 0, "failed": 1,
                      "dead_letter": 0, "cancelled": 0}
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"-- 2 waiting \(queued, rendered\), oldest (1m59s|2m\d*s?|\d+m\d+s)", summary), summary
    body = json.loads(service.cli("schedule", "--json").stdout)
    assert body["depth"] == 2 and body["by_status"]["failed"] == 1 and body["oldest_age_ms"] >= 110_000


def test_wrong_or_missing_token_and_flags_override(service: Service) -> None:
    wrong = service.cli("schedule", token="not-the-token")
    assert wrong.code == 1
    assert _one_line_error(wrong) == ("mailtrio: the internal API refused the token (401): "
                                      "check MAIL_INTERNAL_HTTP_TOKEN or --token")
    missing = service.cli("deliveries", "list", token=None)
    assert missing.code == 1
    assert "requires a bearer token (401)" in _one_line_error(missing)
    # --addr and --token override the variables
    done = run_cli(["schedule", "--json", "--addr", service.addr, "--token", "operator-s3cret-token"],
                   base_env(MAIL_INTERNAL_HTTP_ADDR=closed_addr(), MAIL_INTERNAL_HTTP_TOKEN="wrong"))
    assert done.code == 0 and json.loads(done.stdout)["depth"] == 0, done


def test_service_down_and_usage_errors() -> None:
    env = base_env(MAIL_INTERNAL_HTTP_ADDR=closed_addr())
    for args in (["schedule"], ["deliveries", "retry", "x"], ["dead-letters", "retry", "--all"]):
        down = run_cli(args, env)
        assert down.code == 1, down
        line = _one_line_error(down)
        assert line.startswith(f"mailtrio: cannot reach the internal API at http://{env['MAIL_INTERNAL_HTTP_ADDR']}:")
        assert "is `mailtrio serve` running?" in line
    bad_addr = run_cli(["schedule"], base_env(MAIL_INTERNAL_HTTP_ADDR="no-port"))
    assert bad_addr.code == 2 and "MAIL_INTERNAL_HTTP_ADDR" in _one_line_error(bad_addr)
    for args in (["deliveries", "list", "--status", "lost"], ["dead-letters", "retry"],
                 ["dead-letters", "retry", "--all", "--since", "yesterday"], ["deliveries", "retry"],
                 ["malformed", "list", "--limit", "0"], ["deliveries"]):
        usage = run_cli(args, env)
        assert usage.code == 2, (args, usage)
        assert usage.stdout == "" and "usage: mailtrio" in usage.stderr, usage
